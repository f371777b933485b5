"""The code file MLflow logs as the raw-image model ("models from code").

MLflow runs this file to load the model, instead of unpickling an object; the
class it names lives in :mod:`tlpipe.serve.pyfunc`, so tlpipe must be installed
where the model is served.
"""

import mlflow

from tlpipe.serve.pyfunc import RawImageClassifier

mlflow.models.set_model(RawImageClassifier())
