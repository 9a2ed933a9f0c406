"""How the trained tiny InternVL was made: `python -m training.train_tiny OUT --seed 0` from a checkout.

Not part of the installed package (`pip install .` ships `pipeline/` only) and never imported by a run: the model it
made is committed as weights in pipeline/embedded/tiny_trained/, written out by `make-tiny-model --trained`.
train_tiny (the steps in order, the command line), seeing (the constructed encoder and its fast twin), tokenizer,
model (the config, the constructed projector and heads, the entries training keeps), samples (training data drawn
from pipeline/embedded/world), shape_head (the encoder's trained classifier), forward (the training forward with the
image side cached), language (the language model's training loop).
"""
