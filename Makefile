# One command sets everything up, one runs the tests. See README.md.
# ROS_DISTRO picks the ROS 2 wheels: jazzy (LTS, the default) in .venv, kilted in .venv-kilted; each has its own
# lock file and build folder, so both can sit side by side.
SUPPORTED_DISTROS := jazzy kilted
ROS_DISTRO ?= jazzy
ifeq ($(filter $(ROS_DISTRO),$(SUPPORTED_DISTROS)),)
$(error ROS_DISTRO=$(ROS_DISTRO) is not built here: choose one of $(SUPPORTED_DISTROS), e.g. make setup ROS_DISTRO=jazzy (docs/building.md, "Supported ROS 2 distributions"))
endif
VENV   ?= $(if $(filter jazzy,$(ROS_DISTRO)),.venv,.venv-$(ROS_DISTRO))
BUILD  ?= $(if $(filter jazzy,$(ROS_DISTRO)),build,build-$(ROS_DISTRO))
LOCK   := requirements/lock-$(ROS_DISTRO).txt
PY     := $(VENV)/bin/python
PYTHON ?= python3.11
# Demo settings: the tiny random checkpoint by default; MODEL=OX-PIXL/SpatialThinker-7B DEVICE=cuda for the real one.
MODEL  ?=
DEVICE ?= auto

# ROS 2 finds packages (ours included) through AMENT_PREFIX_PATH; the venv is the prefix.
export AMENT_PREFIX_PATH := $(abspath $(VENV))
export CMAKE_PREFIX_PATH := $(abspath $(VENV))
export ROS_DISTRO

# Targets that need what `make setup` installs say so in one line, rather than in CMake errors about ament_cmake.
DISTRO_ARG := $(if $(filter jazzy,$(ROS_DISTRO)),, ROS_DISTRO=$(ROS_DISTRO))
ifneq ($(filter build test fuzz demo,$(MAKECMDGOALS)),)
ifneq ($(words $(wildcard $(PY) $(VENV)/share/ament_cmake/cmake/ament_cmakeConfig.cmake)),2)
$(error $(VENV) is not set up: run `make setup$(DISTRO_ARG)` first)
endif
endif

.PHONY: setup build test fuzz demo clean

setup: ## venv + pinned dependencies (ROS 2 $(ROS_DISTRO) wheels, model stack, colcon) + interface build + package install
	@test -x $(PY) || scripts/check_free_disk.sh $(VENV) 8
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "setup: installing the pinned ROS 2 $(ROS_DISTRO) wheels, torch and colcon into $(VENV) ($(LOCK))"
	$(PY) -m pip install --quiet --upgrade 'pip==25.3'
	$(PY) -m pip install --quiet --no-deps -r $(LOCK)
	$(PY) -m pip check
	$(PY) scripts/fix_wheel_cmake_paths.py
	@echo "setup: building the message, service and action interfaces (C++ and Python) and installing the"
	@echo "       package into $(VENV): about a minute the first time, log in $(BUILD).log"
	$(MAKE) --no-print-directory build
	@echo 'setup: done. Next: `make demo$(DISTRO_ARG)` (offline, about a minute), then "Without a GPU or a camera" in README.md'

build: ## (re)build interfaces and install the package into the venv prefix; incremental
	cmake -S . -B $(BUILD) -DCMAKE_INSTALL_PREFIX=$(abspath $(VENV)) -DPython3_EXECUTABLE=$(abspath $(PY)) \
	  -DBUILD_TESTING=OFF -DCMAKE_BUILD_TYPE=Release > $(BUILD).log 2>&1 || (cat $(BUILD).log; exit 1)
	cmake --build $(BUILD) -j2 >> $(BUILD).log 2>&1 || (tail -50 $(BUILD).log; exit 1)
	cmake --install $(BUILD) >> $(BUILD).log 2>&1 || (tail -50 $(BUILD).log; exit 1)

test: build ## the whole suite
	scripts/run_tests.sh $(VENV)

fuzz: build ## the property tests with random seeds and 10x the examples (docs/building.md, "Property tests")
	HYPOTHESIS_PROFILE=fuzz scripts/run_tests.sh $(VENV) -m hypothesis --timeout=3600

demo: build ## ask the node a question about bundled images, offline
	$(PY) -P -m spatialthinker_ros.demo $(if $(MODEL),--model $(MODEL)) --device $(DEVICE)

clean:
	rm -rf $(BUILD) $(BUILD).log
