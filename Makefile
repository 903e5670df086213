# The two set-up commands of the README. Each creates .venv/ (torch pinned to the CPU wheel).
.PHONY: demo test venv

venv:
	bash scripts/setup_env.sh

demo: venv
	.venv/bin/mlpfuse demo

test: venv
	bash scripts/run_tests.sh
	bash scripts/lint.sh
