# proxyvm — build entry points. `make image` must run as root on Debian 12 (see image-build/README.md).
.PHONY: image boot-test clean-image

PYTHON ?= .venv/bin/python

image:
	image-build/build.sh

boot-test: image
	$(PYTHON) -m pytest -q -s -m e2e tests/e2e/test_image_boot.py

clean-image:
	rm -rf out/proxyvm* out/.proxyvm.key image-build/work
