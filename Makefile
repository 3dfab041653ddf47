# The two commands of the README: `make demo` and `make test`. Both set up .venv first.
SHELL := /bin/bash
PY := .venv/bin/python
REAL ?= ../shared/data/real
OUT ?= out/demo

.PHONY: setup demo test bench samples clean gnpfa

setup:
	@bash scripts/setup.sh

samples: setup
	@rm -rf examples/samples && mkdir -p examples/samples
	@$(PY) examples/samples.py examples/samples --real $(REAL) --only-good

demo: samples
	$(PY) -m pipelines.cli run $(REAL) examples/samples --out $(OUT)
	$(PY) -m pipelines.cli query $(OUT) "select c.clip_id, regexp_extract(c.uri, '[^/]+$$') as video, c.start_s, c.end_s, c.speech_ratio, c.face_size_px from clips c order by c.uri, c.start_s"
	$(PY) -m pipelines.cli query $(OUT) "select regexp_extract(uri, '[^/]+$$') as video, reason, message from quarantine order by uri"
	$(PY) -m pipelines.cli query $(OUT) "select clip_id, emotion, intensity, style_tags, caption from labels order by clip_id"
	$(PY) -m pipelines.cli previews $(OUT) --limit 3

test: setup
	$(PY) -m pytest -q -ra --durations=10 tests

bench: setup
	$(PY) bench/bench_ingest.py --real $(REAL)
	$(PY) bench/bench_asd.py --proxy
	$(PY) bench/bench_models.py
	$(PY) -m pipelines.cli run $(REAL) --out out/bench-real
	$(PY) bench/bench_gnpfa.py --dataset out/bench-real
	$(PY) bench/bench_labels.py --dataset out/bench-real
	$(PY) bench/bench_shards.py --dataset out/bench-real
	$(PY) bench/bench_e2e.py --real $(REAL)
	$(PY) bench/bench_train.py --export out/bench-real

# rebuild the shipped GNPFA (models/assets/gnpfa-v1) from ../shared, then measure it on its held-out people
gnpfa: setup
	SHARED=$(abspath $(REAL)/../..) bash scripts/build_gnpfa.sh
	$(PY) bench/bench_gnpfa.py --section heldout --section cost --real $(REAL)

clean:
	rm -rf out examples/samples .pytest_cache
