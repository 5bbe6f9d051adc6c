# One command each: `make demo` runs the main job, `make test` the test suite.
# Both create .venv when it is missing. TORCH_SPEC picks the torch build: the default is the
# CPU wheel this project's CI machines carry; GPU users see README.md.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
# `make zoo`: every bundle as a model-zoo archive in $(ZOO); metadata checked against SCHEMA when it is there.
ZOO ?= zoo
ZOO_BUNDLES ?= $(patsubst %/configs/metadata.json,%,$(wildcard bundles/*/configs/metadata.json))
SCHEMA ?= ../shared/monai/meta_schema_20240725.json
# `make test-monailabel`: MONAI Label in a venv of its own (README.md, MONAI Label). `===` takes
# the torch 2.13.0 build that torchvision 0.28.0 is built for (PyPI's default), never a local
# `2.13.0+cpu` wheel, beside which torchvision does not import.
MONAILABEL_VENV := build/venv-monailabel
MONAILABEL_TORCH_SPEC ?= torch===2.13.0
# monailabel requires sam2, which PyPI has only as source. Built in an isolated environment, it
# would download a CUDA torch (GBs) to build against; built here without isolation, against
# the venv's torch, and without its optional CUDA kernel, it is a plain Python package.
MONAILABEL_SAM2_SPEC ?= sam2==1.1.0

.PHONY: venv test test-monailabel demo bench study zoo clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

venv: $(BIN)/.installed

test: venv
	$(BIN)/python -m pytest $(PYTEST_ARGS)

$(MONAILABEL_VENV)/.installed: pyproject.toml
	test -x $(MONAILABEL_VENV)/bin/python || $(PYTHON) -m venv $(MONAILABEL_VENV)
	$(MONAILABEL_VENV)/bin/python -m pip install -q --upgrade pip
	$(MONAILABEL_VENV)/bin/python -m pip install -q "$(MONAILABEL_TORCH_SPEC)" setuptools
	SAM2_BUILD_CUDA=0 $(MONAILABEL_VENV)/bin/python -m pip install -q --no-build-isolation --no-deps "$(MONAILABEL_SAM2_SPEC)"
	$(MONAILABEL_VENV)/bin/python -m pip install -q -e ".[test,monailabel]"
	touch $@

test-monailabel: $(MONAILABEL_VENV)/.installed
	$(MONAILABEL_VENV)/bin/python -m pytest tests/test_monailabel.py -rs $(PYTEST_ARGS)

demo: venv
	$(BIN)/python -m medssl.demo

# `make bench`: every benchmark with small repeat counts (about 25 minutes on 2 quiet CPU cores), results in
# bench/results/*.json, then docs/benchmarks.md. Frepa's Swin and CNN networks take minutes per step at paper
# size on a CPU: add them on a GPU with BENCH_PAPER_NETWORKS="hiend_mae maesil frepa_vit frepa_swin frepa_cnn".
BENCH_PAPER_NETWORKS ?= hiend_mae maesil frepa_vit

bench: venv
	$(BIN)/python bench/bench_pretrain_step.py --preset demo --warmup 1 --steps 2 --out bench/results/pretrain_step_demo.json
	$(BIN)/python bench/bench_pretrain_step.py --preset demo --networks hiend_mae maesil frepa_vit --compile --warmup 2 --steps 10 --out bench/results/pretrain_step_demo_compile.json
	$(BIN)/python bench/bench_pretrain_step.py --preset paper --networks $(BENCH_PAPER_NETWORKS) --warmup 1 --steps 2 --out bench/results/pretrain_step_paper.json
	$(BIN)/python bench/bench_data.py --preset demo --out bench/results/data_demo.json
	$(BIN)/python bench/bench_data.py --preset paper --batch-size 2 --out bench/results/data_paper.json
	$(BIN)/python bench/bench_inference.py --preset paper --warmup 0 --repeats 1 --out bench/results/inference_paper.json
	$(BIN)/python bench/bench_inference.py --preset paper --amp --warmup 0 --repeats 1 --out bench/results/inference_paper_amp.json
	$(BIN)/python bench/bench_finetune_step.py --preset demo --warmup 1 --steps 5 --out bench/results/finetune_step_demo.json
	$(BIN)/python bench/bench_ops.py --warmup 1 --repeats 3 --out bench/results/ops.json
	$(BIN)/python bench/bench_maesil.py --steps 1 --out bench/results/maesil.json
	$(BIN)/python bench/bench_profile.py --preset demo --networks hiend_mae maesil frepa_vit --warmup 2 --steps 5 --out bench/results/profile_demo.json
	$(BIN)/python bench/bench_profile.py --preset paper --networks hiend_mae maesil --warmup 1 --steps 2 --out bench/results/profile_paper.json
	$(BIN)/python bench/report.py

# `make study`: pretrained vs scratch fine-tuning with 1, 2, 4 labelled scans, 3 seeds (hours on a CPU;
# restartable: finished runs under runs/study/ and those recorded in docs/results*.json are reused),
# with seg_finetune's networks, then with a linear head on the ViT methods' tokens, then with
# three times the fine-tuning budget at k = 1, then the small grid again with bfloat16 autocast
# fine-tuning (`--amp`: 2-2.5x faster UNETR runs on a CPU with AVX512-BF16), then the parts of three
# more presets that were run (docs/study_findings.md, E18 and E19): isodense soft tissues at 120 and
# 360 steps, 64 unlabelled scans for pretraining (8 seeds for four methods and for the Frepa-CNN
# ablation without low-frequency perturbation, E21 and E22; Frepa-CNN pretrained from a second seed, E26), twice
# that fine-tuning budget for Frepa-CNN (8 seeds) and Frepa-ViT (4 seeds, E24 and E26), and Hi-End-MAE at 360
# steps with bfloat16 (8 seeds, E22).
# `--size paper` is for GPUs.
study: venv
	$(BIN)/python bench/study.py --size small --out docs/results.md --jobs 2
	$(BIN)/python bench/study.py --size small --decoder linear --out docs/results_linear.md --jobs 2
	$(BIN)/python bench/study.py --size small-long --out docs/results_long.md --jobs 2
	$(BIN)/python bench/study.py --size small --amp --out docs/results_amp.md --jobs 2
	$(BIN)/python bench/study.py --size small-isodense --amp --out docs/results_isodense.md --jobs 2 \
		--probe-label-counts --methods hiend_mae frepa_vit maesil
	$(BIN)/python bench/study.py --size small-isodense-long --amp --out docs/results_isodense_long.md --jobs 2 \
		--probe-label-counts --methods hiend_mae frepa_vit
	$(BIN)/python bench/study.py --size small-long-pretrain64 --amp --out docs/results_pretrain64.md --jobs 2 \
		--probe-label-counts --methods hiend_mae frepa_vit maesil frepa_cnn frepa_cnn_no_lfp frepa_cnn_seed1 \
		--seeds 0 1 2 3 4 5 6 7
	$(BIN)/python bench/study.py --size small-long-pretrain64 --amp --out docs/results_pretrain64.md --jobs 2 \
		--probe-label-counts --methods frepa_swin
	$(BIN)/python bench/study.py --size small-long-pretrain64 --amp --out docs/results_pretrain64.md \
		--probe-label-counts --methods hiend_mae frepa_vit maesil frepa_cnn frepa_cnn_no_lfp frepa_cnn_seed1 frepa_swin \
		--seeds 0 1 2 3 4 5 6 7 --report-only
	$(BIN)/python bench/study.py --size small-longer-pretrain64 --amp --out docs/results_pretrain64_720.md --jobs 2 \
		--probe-label-counts --methods frepa_cnn --seeds 0 1 2 3 4 5 6 7
	$(BIN)/python bench/study.py --size small-longer-pretrain64 --amp --out docs/results_pretrain64_720.md --jobs 2 \
		--probe-label-counts --methods frepa_vit --seeds 0 1 2 3
	$(BIN)/python bench/study.py --size small-longer-pretrain64 --amp --out docs/results_pretrain64_720.md \
		--probe-label-counts --methods frepa_cnn frepa_vit --seeds 0 1 2 3 4 5 6 7 --report-only
	$(BIN)/python bench/study.py --size small-long --amp --out docs/results_long_amp.md --jobs 2 \
		--probe-label-counts --methods hiend_mae --seeds 0 1 2 3 4 5 6 7

zoo: venv
	$(BIN)/python -m medssl.zoo pack --bundles $(ZOO_BUNDLES) --out $(ZOO) $(if $(wildcard $(SCHEMA)),--schema $(SCHEMA))

clean:
	rm -rf $(VENV) $(MONAILABEL_VENV) bundles/*/models bundles/*/eval runs zoo
