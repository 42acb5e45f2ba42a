# cdr-streamer developer commands. `make test` is the one test command (CI runs it too).
#
#   make bootstrap    system tools, .venv with pinned dependencies, Kafka jars
#   make lint         ruff + mypy --strict
#   make test         bootstrap, lint, then the whole pytest suite (unit + integration)
#   make demo         the pipeline end to end on this machine (Ctrl-C stops everything)
#   make bench        the benchmarks
#   make kafka-start / kafka-stop   a local broker in var/kafka for manual work
#   make clean        remove caches, var/ and build output (keeps .venv and .cache)

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

VENV := .venv
PY := $(VENV)/bin/python

.PHONY: help bootstrap lint test demo bench kafka-start kafka-stop clean

help:
	@sed -n '3,10s/^# \{0,1\}//p' Makefile

bootstrap:
	scripts/bootstrap

lint: bootstrap
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

# pytest's own closing line ("N passed, ...") is the summary; -ra lists skips and failures.
test: bootstrap lint
	$(VENV)/bin/pytest

# On a terminal the demo runs as a job of its own (bash -m), so Ctrl-C reaches the demo
# (which stops everything and exits 0) and not make itself, which would die of SIGINT.
demo: bootstrap
	@if [ -t 0 ]; then bash -mc 'scripts/demo; exit $$?'; else scripts/demo; fi

bench: bootstrap
	$(PY) -m bench

kafka-start: bootstrap
	scripts/kafka-local start --dir var/kafka

kafka-stop:
	scripts/kafka-local stop --dir var/kafka

clean: kafka-stop
	scripts/kafka-local stop --dir var/demo/kafka
	rm -rf var build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis
	find . -path ./.venv -prune -o -name __pycache__ -type d -exec rm -rf {} +
