# `make test` and `make demo` build .venv from the pinned requirements on first use, then reuse it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEMO := demo-run

.PHONY: test demo venv clean system-packages

venv: $(VENV)/.installed

# From Debian's packages, when missing (as root, as CI runs): a Java runtime for pycocoevalcap's METEOR and
# PTB tokeniser (metrics.py --coco-eval), and Chromium with its WebDriver for serve.py's page test.
system-packages:
	@missing=""; command -v java >/dev/null || missing="default-jre-headless"; \
	 [ -x /usr/bin/chromium ] || missing="$$missing chromium"; [ -x /usr/bin/chromedriver ] || missing="$$missing chromium-driver"; \
	 if [ -n "$$missing" ]; then echo "installing$$missing"; apt-get update -qq && \
	   DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; fi

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $@

test: venv system-packages
	$(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=15 tests

# A small GIT learns to caption drawn scenes from scratch, offline, on the CPU.
demo: venv
	$(PY) train.py --model tiny --dataset synthetic --synthetic-size 5000 --output-dir $(DEMO) --overwrite-output-dir \
		--epochs 8 --learning-rate 3e-4 --warmup-steps 30 --batch-size 32 --grad-accum 1 \
		--eval-steps 282 --save-steps 564 --logging-steps 94 --num-examples 2
	$(PY) data.py synthetic --size 3 --seed 2026 --out $(DEMO)/unseen
	@echo "--- captions for 3 scenes the model never saw ($(DEMO)/unseen/metadata.jsonl has the truth):"
	$(PY) infer.py --model $(DEMO)/best $(DEMO)/unseen/000000.png $(DEMO)/unseen/000001.png $(DEMO)/unseen/000002.png
	@echo "--- truth:"
	@cut -d'"' -f8 $(DEMO)/unseen/metadata.jsonl
	@echo "--- watch the run: $(PY) -m tensorboard.main --logdir $(DEMO)/runs"

clean:
	rm -rf $(DEMO) .pytest_cache

# Training speed of the guide's Trainer recipe and of train.py on the same data, model and steps
# (about 15 min on 2 CPU cores; run it alone on the machine). Numbers in bench/results.json.
.PHONY: bench
bench: $(VENV)/.installed-bench
	$(PY) bench/bench.py

$(VENV)/.installed-bench: requirements.txt requirements-bench.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r requirements-bench.txt
	touch $@

# The training step and generate at git-base size on a CUDA GPU: eager / sdpa / sdpa+compile attention,
# fp16 + GradScaler and bf16; images/s, peak GPU memory, MFU. Stops in one line without a GPU.
.PHONY: bench-gpu
bench-gpu: venv
	$(PY) bench/gpu.py --device cuda --json bench/gpu.json

# The first CUDA GPU we get: sdpa against eager, the whole program (fp16, kill -9 and resume), the
# speed tables; one table, every number in bench/check-gpu.json. About 8 minutes on one modern GPU.
.PHONY: check-gpu
check-gpu: venv
	$(PY) bench/check_gpu.py --device cuda --json bench/check-gpu.json
