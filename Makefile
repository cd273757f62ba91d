# `make demo` and `make test` work on a fresh clone: each creates .venv and installs the project into
# it first. An active virtualenv is used as it is: the project (with its test extras) is installed
# into it only when it lacks kosmos, and pip is never upgraded there. The tests always run this
# clone's code (PYTHONPATH), whichever clone the virtualenv's install points at.
PYTHON ?= python3.11
TORCH ?= torch==2.14.1 torchvision==0.29.1
ifdef VIRTUAL_ENV
VENV := $(VIRTUAL_ENV)
else
VENV := .venv
endif
BIN := $(VENV)/bin
STAMP := $(VENV)/.kosmos-installed
PYTEST := PYTHONPATH=$(CURDIR) $(BIN)/python -m pytest -q -p no:cacheprovider

.PHONY: install demo mmcot test unit lint clean

ifdef VIRTUAL_ENV
install:
	$(BIN)/python -c "import kosmos, pytest" 2>/dev/null || $(BIN)/python -m pip install -q -e ".[dev]"
else
install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)
endif

# The demo: sample corpus (built when sample/ is absent) -> tiny model trained
# under DeepSpeed on CPU (with a held-out validation loss) -> evaluated on held-out digits -> the run
# report (kosmos report) -> exported to `transformers`. Running it
# again finds the run trained (at once) and re-uses its evaluation.
RUN ?= runs/tiny
demo: install
	test -d sample || $(BIN)/kosmos data sample --out sample
	$(BIN)/kosmos train --config configs/train/tiny.yaml --run-dir $(RUN)
	$(BIN)/kosmos eval --checkpoint $(RUN) --tasks digits_vqa,digits_classification,digits_captioning \
		--data-root sample --out $(RUN)/eval
	$(BIN)/kosmos report $(RUN)
	rm -rf $(RUN)/hf
	$(BIN)/kosmos convert to-hf $(RUN) $(RUN)/hf
	@echo
	@echo "sample corpus:       sample/  (kosmos data inspect sample/caption)"
	@echo "run folder:          $(RUN)/  (config.yaml, metrics.jsonl, checkpoints/, tensorboard/)"
	@echo "evaluation report:   $(RUN)/eval/report.md"
	@echo "run report:          $(RUN)/report/report.md  (report.png: training and validation loss, LR, skips)"
	@echo "transformers export: $(RUN)/hf  (Kosmos2ForConditionalGeneration.from_pretrained)"

# Multimodal chain-of-thought on the sample corpus's ScienceQA-format digits (docs/mmcot.md): the tiny
# model fine-tuned for rationales (stage 1), rationales generated for the test problems, the tiny model
# fine-tuned to answer from a rationale (stage 2), then stage 2 answering from stage 1's rationales.
# Both stages start from runs/tiny when it has been trained (configs/train/tiny.yaml), else from a
# short pretraining run of the same recipe. A sample/ built before the digit problems existed is
# rebuilt (the same bytes, plus sample/scienceqa/).
MMCOT := runs/mmcot_tiny
MMCOT_INIT := $(if $(wildcard runs/tiny/checkpoints/latest),runs/tiny,$(MMCOT)/pretrain)

mmcot: install
	test -f sample/scienceqa/problems.json || { rm -rf sample && $(BIN)/kosmos data sample --out sample; }
	test -f $(MMCOT_INIT)/checkpoints/latest || $(BIN)/kosmos train --config configs/train/tiny.yaml \
		--run-dir $(MMCOT_INIT) train.max_steps=100 checkpoint.interval=100
	rm -rf $(MMCOT)/corpora $(MMCOT)/rationale $(MMCOT)/answer $(MMCOT)/eval
	for stage in rationale answer; do \
		$(BIN)/kosmos data build scienceqa --root sample/scienceqa --stage $$stage \
			--out $(MMCOT)/corpora/$$stage || exit 1; \
	done
	$(BIN)/kosmos train --config configs/train/mmcot_rationale_tiny.yaml --run-dir $(MMCOT)/rationale \
		train.init_from=$(MMCOT_INIT)
	$(BIN)/kosmos mmcot rationales --checkpoint $(MMCOT)/rationale --data sample/scienceqa --split test \
		--max-new-tokens 64 --out $(MMCOT)/eval/rationales
	$(BIN)/kosmos train --config configs/train/mmcot_answer_tiny.yaml --run-dir $(MMCOT)/answer \
		train.init_from=$(MMCOT_INIT)
	$(BIN)/kosmos mmcot answers --checkpoint $(MMCOT)/answer --data sample/scienceqa --split test \
		--rationales $(MMCOT)/eval/rationales/predictions.jsonl --out $(MMCOT)/eval/answers

test: install
	$(PYTEST) tests

# The unit half: everything but the multi-process and end-to-end tests (marked `slow`).
unit: install
	$(PYTEST) -m "not slow" tests

lint:
	test -x $(BIN)/ruff || $(MAKE) install
	$(BIN)/ruff check kosmos tests data launch

clean:
	rm -rf runs sample .pytest_cache
