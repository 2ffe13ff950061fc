# Two commands on a fresh machine (Python 3.11+, pip and make): `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.yoloq-installed
PARAMS ?= params.yaml
VAL    ?= data/coco/val
CRON   ?=
WATCH  ?= checkpoints
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export YOLO_OFFLINE ?= 1

.PHONY: install run test test-fast bench lint clean serve watch

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[export,dev]'
	$(BIN)/python -m pip install --quiet --no-deps yolov5==7.0.14
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/yoloq run -p $(PARAMS)

test: $(STAMP)
	$(BIN)/ruff check yoloq flows tasks tests benchmarks
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)     # the unit tests: everything but the real flows and servers (-m "not slow")
	$(BIN)/ruff check yoloq flows tasks tests benchmarks
	$(BIN)/python -m pytest -q -m "not slow"

bench: $(STAMP)
	$(BIN)/python benchmarks/cpu_int8.py $(foreach v,$(VAL),--val $(v))

# Operations (README): need PREFECT_API_URL pointing at `prefect server start --host 127.0.0.1 --port 4200`.
serve: $(STAMP)
	mkdir -p $(WATCH)
	$(BIN)/python -m flows.deploy serve -p $(PARAMS) --watch-root $(WATCH) $(if $(CRON),--cron "$(CRON)")

watch: $(STAMP)
	$(BIN)/yoloq watch $(WATCH)

lint: $(STAMP)
	$(BIN)/ruff check yoloq flows tasks tests benchmarks
	$(BIN)/ruff format --check yoloq flows tasks tests benchmarks

clean:
	rm -rf runs mlartifacts mlflow.db
