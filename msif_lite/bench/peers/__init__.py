"""Scripts that run a peer library (kronfluence, ...) in *another* interpreter, for the
benchmarks that compare the kit with it side by side (`msif-lite bench fit-speed`).

Nothing here is imported by the kit or by `msif_lite.bench.discover` (which scans only the
top-level modules of `msif_lite.bench`): a peer script is run as a file, by the peer's own
Python, and imports only the peer library, torch, transformers and `peer_io` (the
stdlib + torch + transformers helpers both sides share). This file imports nothing.

kronfluence's interpreter (a throwaway venv: never install kronfluence into the kit's env,
its torchvision requirement breaks transformers there), with the CPU torch from the
constraints and no torchvision (kronfluence 1.0.1 never imports it):

    python3 -m venv /tmp/kfvenv
    /tmp/kfvenv/bin/pip install torch==2.13.0
    /tmp/kfvenv/bin/pip install -c requirements/constraints.txt --no-deps kronfluence==1.0.1
    /tmp/kfvenv/bin/pip install -c requirements/constraints.txt accelerate einops einconv \
        opt_einsum safetensors tqdm scikit-learn scipy numpy transformers tokenizers

(`pip list` there shows no nvidia-* package; `pip check` names only the missing torchvision.)
"""
