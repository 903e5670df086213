"""report.html: every linked plot exists and is a valid PNG; sections without data are skipped;
the page renders in headless Chromium with every image loaded (when Chromium is installed)."""

from __future__ import annotations

import math
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from mlpfuse.orchestrator.report_html import pareto_front, write_html

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CHROMIUM = Path("/usr/bin/chromium")


def _report() -> dict:
    cands = []
    methods = {"fusion": 1.0, "merge": 1.3, "moefy": 2.0, "prune-activation": 0.9, "layer-drop": 4.0}
    for k, (m, scale) in enumerate(methods.items()):
        for j, keep in enumerate((0.5, 0.67, 0.8)):
            params = int(135e6 * (0.55 + 0.45 * keep))
            ppl = 41.5 * (1 + scale * (1 - keep) * 3)
            rounds = [{"tokens": 512, "perplexity": ppl * 1.1}]
            if j > 0:
                rounds.append({"tokens": 2048, "perplexity": ppl * 1.03})
            if j == 2:
                rounds.append({"tokens": 8192, "perplexity": ppl})
            cands.append({"name": f"{m}-{keep}", "method": m, "settings": {"keep": keep, "window": 2},
                          "params": params, "perplexity": rounds[-1]["perplexity"], "rounds": rounds,
                          "seconds": 3.5 + k})
    cands.append({"name": "broken", "method": "fusion", "settings": {}, "params": 1e8, "perplexity": float("nan"),
                  "rounds": [], "seconds": 1.0})
    L = 6
    return {
        "name": "synthetic <demo>", "model": "smollm2-135m", "seconds": 123.4,
        "base": {"params": 134_515_008, "ff_params": 79_626_240, "perplexity": 41.47},
        "candidates": cands,
        "winner": {"name": "prune-activation-0.8", "reason": "lowest perplexity among candidates under budget"},
        "similarity": [[1.0 - abs(i - j) / L for j in range(L)] for i in range(L)],
        "layer_errors": {"fusion": [0.1 * (i + 1) for i in range(L)], "merge": [0.05, None, 0.3, 0.2, 0.1, 0.4]},
        "distill": {"losses": [2.0 * math.exp(-s / 30) + 0.1 for s in range(100)], "perplexity": 44.0},
        "export": {"path": "/x/model", "form": "stock", "params": 110_000_000, "unique_params": 100_000_000,
                   "ff_params": 55_000_000, "unique_ff_params": 45_000_000, "padded_params": 12_345,
                   "num_hidden_layers": 29, "intermediate_sizes": {"intermediate_size": 1200}},
        "stages": {"shard": {"stage": "shard", "cache_key": "c52e", "status": "hit", "seconds": 0.4, "path": "/p"},
                   "evaluate": {"stage": "evaluate", "cache_key": "8b30", "status": "ran", "seconds": 12.0}},
    }


def _img_srcs(page: str) -> list[str]:
    return re.findall(r'<img[^>]*\bsrc="([^"]+)"', page)


def test_every_image_is_a_png(tmp_path: Path) -> None:
    path = write_html(_report(), tmp_path)
    page = path.read_text()
    srcs = _img_srcs(page)
    assert {Path(s).stem for s in srcs} == {"params", "pareto", "halving", "similarity", "layer_errors", "distill"}
    for src in srcs:
        assert not src.startswith(("/", "http")), src  # relative: readable from disk, anywhere
        f = path.parent / src
        assert f.is_file() and f.read_bytes()[:8] == PNG_MAGIC, src
    assert "synthetic &lt;demo&gt;" in page and "<demo>" not in page  # escaped
    assert page.count("<tr") >= 17  # candidates and stages tables
    assert "prune-activation-0.8 ★" in page and "not drawn" not in page


def test_missing_sections_are_skipped(tmp_path: Path) -> None:
    path = write_html({"name": "bare", "base": {"params": 10, "ff_params": 4, "perplexity": 3.0}}, tmp_path)
    srcs = _img_srcs(path.read_text())
    assert [Path(s).stem for s in srcs] == ["params"]
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["params.png"]
    # Written again with no data at all: no images and no stale files.
    write_html({}, tmp_path)
    assert _img_srcs((tmp_path / "report.html").read_text()) == []
    assert list((tmp_path / "plots").iterdir()) == []


def test_pareto_front() -> None:
    pts = [(10, 5.0), (8, 6.0), (12, 4.0), (9, 7.0), (8, 5.5)]
    assert pareto_front(pts) == [4, 0, 2]


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium (Debian package chromium)")
def test_chromium_loads_every_image(tmp_path: Path) -> None:
    path = write_html(_report(), tmp_path / "report")
    n = len(_img_srcs(path.read_text()))
    # A copy beside the report (same relative paths) that records what the browser loaded.
    probe = path.with_name("probe.html")
    probe.write_text(path.read_text().replace("</body>", """<script>
window.addEventListener('load', () => {
  const imgs = [...document.images];
  const ok = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
  document.body.setAttribute('data-images', imgs.length + '/' + ok);
});
</script></body>"""))
    profile = tmp_path / "profile"
    cmd = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--allow-file-access-from-files", f"--user-data-dir={profile}", "--virtual-time-budget=5000",
           "--dump-dom", probe.as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    shutil.rmtree(profile, ignore_errors=True)
    m = re.search(r'data-images="(\d+)/(\d+)"', proc.stdout)
    assert m, proc.stderr[-2000:]
    assert int(m.group(1)) == n > 0 and int(m.group(2)) == n
