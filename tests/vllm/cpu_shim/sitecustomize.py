"""CPU test lane only: every Python process started with this folder on PYTHONPATH defines the torchvision operator
schemas (torchvision_shim) just before its first `import torchvision`; processes that never import it pay nothing.

vLLM imports its model code in child processes too (the model-registry inspection runs `python -m ...`, Ray actors
are fresh interpreters), so defining the schemas in the test process alone is not enough; tests/vllm/lane.py puts this
folder on PYTHONPATH for them.
"""

import importlib.abc
import sys


class _BeforeTorchvision(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torchvision":
            sys.meta_path.remove(self)
            import torchvision_shim

            torchvision_shim.install()
        return None  # the normal finders import it


sys.meta_path.insert(0, _BeforeTorchvision())
