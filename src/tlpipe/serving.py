"""The raw-image model's old import path, kept for models already in MLflow stores.

A "models from code" model runs the code file saved with it when it is loaded.
Models logged before tlpipe was split into subpackages carry a file that does
``from tlpipe.serving import RawImageClassifier``; this keeps them loadable
(a registered champion among them). New models import :mod:`tlpipe.serve.pyfunc`.
"""

from tlpipe.serve.pyfunc import RawImageClassifier

__all__ = ["RawImageClassifier"]
