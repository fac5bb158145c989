"""ILSVRC-2012's sizes: what a generated sample may not exceed and params.yaml allows.

A module without imports, so `pipeline.config` can bound the `sample` params without
depending on the generator's code.
"""

NUM_SYNSETS = 1000  # classes
MAX_TRAIN_PER_CLASS = 1300  # training images of the largest classes (the smallest have 732)
MAX_VAL_PER_CLASS = 50  # every class has exactly 50 validation images
