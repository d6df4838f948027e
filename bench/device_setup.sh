#!/usr/bin/env bash
# On the GPU machine (no network): install the carried wheels (.whl/, downloaded beforehand with pip
# download for cp312 manylinux) and the project itself, editable, without touching its torch/triton.

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || echo "wheel install failed"
export PYTHONPATH=/tmp/site
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >/dev/null 2>&1 || python3 -m pip install --no-deps --no-build-isolation --no-index -e .
python3 -c "import torch, triton, reactor_graph.nodes; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
