# The few commands people run. Each one installs what it needs into .venv first.
.PHONY: demo test lint bench

demo:  ## install, start hpo serve, run a demo study end to end
	scripts/demo

test:  ## install, then lint and run the whole test suite
	scripts/test

lint:
	.venv/bin/ruff check . && .venv/bin/ruff format --check .

bench:  ## the side-by-side benchmarks recorded in docs/benchmarks.md
	.venv/bin/python benchmarks/samplers.py
	.venv/bin/python benchmarks/dispatch.py
	.venv/bin/python benchmarks/polling.py
