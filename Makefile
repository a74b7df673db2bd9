# make demo / make test / make bench: each creates .venv when missing and installs into it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
# sluiceway[metrics] (ray[default]: a metrics agent on every node) for the one test that scrapes Prometheus;
# the suite's own clusters stay on the minimal ray, which starts in half the time.
METRICS_VENV := .venv-metrics
METRICS_STAMP := $(METRICS_VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

export RAY_USAGE_STATS_ENABLED := 0
export RAY_AUTH_MODE := disabled

.PHONY: demo test bench install clean browser servers metrics-venv sim

# Python packages with uv (several times faster than pip on a fresh machine), pip if uv cannot be had.
$(STAMP): pyproject.toml
	command -v initdb >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	($(PY) -m pip install -q uv==0.13.9 && $(VENV)/bin/uv pip install -q --python $(PY) --compile-bytecode -e ".[test]") || \
		($(PY) -m pip install -q --upgrade pip && $(PY) -m pip install -q -e ".[test]" && $(PY) -m compileall -q -j 0 $(VENV) >/dev/null)
	touch $(STAMP)

$(METRICS_STAMP): $(STAMP)
	test -x $(METRICS_VENV)/bin/python || $(PYTHON) -m venv $(METRICS_VENV)
	($(VENV)/bin/uv pip install -q --python $(METRICS_VENV)/bin/python -e ".[metrics]") || \
		$(METRICS_VENV)/bin/python -m pip install -q -e ".[metrics]"
	touch $(METRICS_STAMP)

metrics-venv: $(METRICS_STAMP)

# The brokers the connector tests start themselves (Debian's packages; none is started as a service).
# PostgreSQL's wal2json output plugin for change data capture, for the installed server's version.
servers:
	command -v redis-server >/dev/null && command -v nats-server >/dev/null && \
		test -x /usr/lib/rabbitmq/bin/rabbitmq-server || (apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server nats-server rabbitmq-server >/dev/null)
	ls /usr/lib/postgresql/*/lib/wal2json.so >/dev/null 2>&1 || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			postgresql-$$(ls /usr/lib/postgresql | sort -n | tail -1)-wal2json >/dev/null)

# The browser the web page's test drives (Debian's chromium).
browser:
	command -v chromium >/dev/null || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m compileall -q -j 0 checkpoint cluster jobs operators >/dev/null
	$(PY) -m sluiceway.jobs.demo

# Byte-compiled ahead: where PYTHONDONTWRITEBYTECODE is set (as on CI) no process writes .pyc files, so
# each one (every Ray worker, every CLI call) would compile Ray and sluiceway from source again, ~1.5 s each.
test: $(STAMP) $(METRICS_STAMP) browser servers
	$(PY) -m compileall -q -j 0 checkpoint cluster jobs operators >/dev/null
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) bench/bench.py

clean:
	rm -rf $(VENV) $(METRICS_VENV) .sluiceway .sluiceway-output build *.egg-info

# The deterministic simulation of the job protocol: SEEDS seeds from FIRST (make test runs 1,000).
SEEDS ?= 10000
FIRST ?= 0
sim: $(STAMP)
	$(PY) -m sluiceway.cluster.simulation --seeds $(SEEDS) --first $(FIRST)
