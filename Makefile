# Two commands do all set-up: `make demo` and `make test` create .venv first if it is missing.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: demo demo-dmae demo-kd test test-slurm test-slow test-all lint bench-teacher-cost bench-dmae-step bench-linear-cache bench-dino-ddp bench-dino-step bench-data study study-quick study-calibrate study-kd study-kd-quick

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(VENV)/bin/pip install --quiet -e '.[dev]'
	touch $(STAMP)

# Short DINO pretraining on scikit-learn's digits with the teacher seeing half of the patches
# (chosen by the student's attention), then k-NN; prints what it learned and what it cost.
demo: $(STAMP)
	$(VENV)/bin/ssl-kd train configs/demo.yaml $(ARGS)

# MAE teacher pretrained on the digits, then distilled into a smaller student with DMAE.
demo-dmae: $(STAMP)
	$(VENV)/bin/ssl-kd train configs/demo_mae_teacher.yaml
	$(VENV)/bin/ssl-kd train configs/demo_dmae.yaml

# A ViT teacher trained on the cluttered digits, then a smaller student four ways (no KD, logit KD,
# MaskedKD at keep 0.5, MaskedKD + ViTKD): one table of student top-1 and teacher PFLOPs.
demo-kd: $(STAMP)
	$(VENV)/bin/python eval/bench/kd_study.py --demo $(ARGS)

# Fast CPU tests (well under 15 minutes); slow/slurm/gpu tests run with test-all.
test: $(STAMP)
	$(VENV)/bin/pytest -m "not slow and not slurm and not gpu" $(PYTEST_ARGS)

# Jobs on a real one-node Slurm the fixture starts on this machine (tests/slurm_cluster.py);
# slurm-wlm and munge are installed with apt-get when missing (root), else skipped with the reason.
test-slurm: $(STAMP)
	$(VENV)/bin/pytest -m slurm $(PYTEST_ARGS)

# Slow tests (the demo must learn, kill -9 and resume, 2-process random masking): ~15 min.
test-slow: $(STAMP)
	$(VENV)/bin/pytest -m "slow and not slurm and not gpu" $(PYTEST_ARGS)

test-all: $(STAMP)
	$(VENV)/bin/pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy ssl_kd

bench-teacher-cost: $(STAMP)
	$(VENV)/bin/python eval/bench/teacher_cost.py

bench-dmae-step: $(STAMP)
	$(VENV)/bin/python eval/bench/dmae_step.py

bench-linear-cache: $(STAMP)
	$(VENV)/bin/python eval/bench/linear_cache.py --epochs 10

bench-dino-ddp: $(STAMP)
	$(VENV)/bin/python eval/bench/dino_ddp.py

# One DINO step, ViT-S/16, 2×224 + 8×96 crops, batch 16, CPU: ssl_kd at keep 1.0/0.66/0.5 vs the
# step lightly's DINO example assembles, interleaved medians + peak memory (~14 min).
bench-dino-step: $(STAMP)
	$(VENV)/bin/python eval/bench/dino_step.py $(ARGS)

# The data pipeline: images/s per DataLoader worker core, official DINO/MAE augmentation (lightly)
# vs ssl_kd's `fast` (workers crop, the training process colours whole batches), 1 and 2 workers,
# side by side over 5 rounds, on a generated folder of 300 JPEGs (~2 min idle) → RESULTS.md.
bench-data: $(STAMP)
	$(VENV)/bin/python eval/bench/data_pipeline.py $(ARGS)

# The learning-quality study on the cluttered digits: DINO and KD at keep 1.0/0.5/0.25 × top-k,
# random, bottom-k and the adaptive keep ratio; MAE vs DMAE (3 seeds; ≤ 45 min on 2 cores).
study: $(STAMP)
	$(VENV)/bin/python eval/bench/learning.py

study-quick: $(STAMP)
	$(VENV)/bin/python eval/bench/learning.py --quick

# The runs that chose each method's default masking.tolerance (seed 100; ~15 min).
study-calibrate: $(STAMP)
	$(VENV)/bin/python eval/bench/learning.py --calibrate

# Supervised distillation on the cluttered digits (3 seeds, every row): eval/bench/RESULTS.md.
study-kd: $(STAMP)
	$(VENV)/bin/python eval/bench/kd_study.py

study-kd-quick: $(STAMP)
	$(VENV)/bin/python eval/bench/kd_study.py --quick
