# One command sets everything up, one runs the tests. See README.md.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PYTHON ?= python3.11
BUILD  ?= build
# Demo settings: the tiny random checkpoint by default; MODEL=OX-PIXL/SpatialThinker-7B DEVICE=cuda for the real one.
MODEL  ?=
DEVICE ?= auto

# ROS 2 finds packages (ours included) through AMENT_PREFIX_PATH; the venv is the prefix.
export AMENT_PREFIX_PATH := $(abspath $(VENV))
export CMAKE_PREFIX_PATH := $(abspath $(VENV))

.PHONY: setup build test demo clean

setup: ## venv + pinned dependencies + interface build + package install
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade 'pip==25.3'
	$(PY) -m pip install --quiet --no-deps -r requirements/lock.txt
	$(PY) -m pip check
	$(PY) scripts/fix_wheel_cmake_paths.py
	$(MAKE) build

build: ## (re)build interfaces and install the package into the venv prefix; incremental
	cmake -S . -B $(BUILD) -DCMAKE_INSTALL_PREFIX=$(abspath $(VENV)) -DPython3_EXECUTABLE=$(abspath $(PY)) \
	  -DBUILD_TESTING=OFF -DCMAKE_BUILD_TYPE=Release > $(BUILD).log 2>&1 || (cat $(BUILD).log; exit 1)
	cmake --build $(BUILD) -j2 >> $(BUILD).log 2>&1 || (tail -50 $(BUILD).log; exit 1)
	cmake --install $(BUILD) >> $(BUILD).log 2>&1 || (tail -50 $(BUILD).log; exit 1)

test: build ## the whole suite
	scripts/run_tests.sh $(VENV)

demo: build ## ask the node a question about bundled images, offline
	$(PY) -P -m spatialthinker_ros.demo $(if $(MODEL),--model $(MODEL)) --device $(DEVICE)

clean:
	rm -rf $(BUILD) $(BUILD).log
