"""``corpus: hf:ID[:CONFIG][@SPLIT]``: a Hugging Face dataset from the local datasets cache, read
offline; one that is not cached is a clear error, never a download."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

CODE = """
import glob, os, sys
import pyarrow as pa, pyarrow.parquet as pq
root = sys.argv[1]
# What datasets.load_dataset('acme/docs') leaves in the datasets cache after an online load.
src = os.path.join(root, 'src'); os.makedirs(src, exist_ok=True)
pq.write_table(pa.table({'text': [f'document {i} ' + 'word ' * 40 for i in range(12)], 'n': list(range(12))}),
               os.path.join(src, 'train.parquet'))
from datasets.packaged_modules.parquet.parquet import Parquet
b = Parquet(cache_dir=os.environ['HF_DATASETS_CACHE'], dataset_name='acme___docs',
            data_files={'train': [os.path.join(src, 'train.parquet')]}, hash='0123abcd')
b.download_and_prepare()
cfg = os.path.dirname(os.path.dirname(b.cache_dir))
os.rename(cfg, os.path.join(os.path.dirname(cfg), 'default'))
for f in glob.glob(os.path.join(os.path.dirname(cfg), 'default', '*', '*', 'acme___docs-*.arrow')):
    os.rename(f, f.replace('acme___docs-', 'docs-'))

from mlpfuse.core.errors import DataError
from mlpfuse.stages.data import corpus_key, load_documents
docs = load_documents('hf:acme/docs@train')
print(len(docs), docs[3][0], corpus_key('hf:acme/docs') == corpus_key('hf:acme/docs'), len(corpus_key('hf:acme/docs')))
try:
    load_documents('hf:acme/absent')
except DataError as e:
    print('error:', e)
print('offline after:', os.environ.get('HF_DATASETS_OFFLINE'))
"""


def test_a_cached_hub_dataset_is_a_corpus(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")}
    env |= {"HF_DATASETS_CACHE": str(tmp_path / "datasets"), "HF_HUB_CACHE": str(tmp_path / "hub")}
    out = subprocess.run([sys.executable, "-c", CODE, str(tmp_path)], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert lines[0] == "12 hf:acme/docs@train:3 True 32"
    assert lines[1].startswith("error: corpus 'hf:acme/absent'") and "not in the local datasets cache" in lines[1]
    assert lines[2] == "offline after: None"  # the offline switch is put back
    assert not list((tmp_path / "hub").glob("datasets--*"))  # nothing was downloaded
