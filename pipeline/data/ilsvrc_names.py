"""ILSVRC-2012's file names as distributed: the archives, the folders in them, the label files.

A module without imports, shared by the readers (`pipeline.data.archives`,
`pipeline.data.labels`) and the sample's archive writer, so the sample stage does not
depend on the readers' code.
"""

TRAIN_TAR = "ILSVRC2012_img_train.tar"  # one <wnid>.tar per class
VAL_TAR = "ILSVRC2012_img_val.tar"  # the val images, flat
DEVKIT = "ILSVRC2012_devkit_t12.tar.gz"
DEVKIT_DATA = "ILSVRC2012_devkit_t12/data"  # the devkit folder holding the two files below
DEVKIT_META = "meta.mat"
DEVKIT_GROUND_TRUTH = "ILSVRC2012_validation_ground_truth.txt"
OFFICIAL_ARCHIVES = (TRAIN_TAR, VAL_TAR, DEVKIT)

KAGGLE_ZIP = "imagenet-object-localization-challenge.zip"
KAGGLE_DATA = "ILSVRC/Data/CLS-LOC"  # holding train/<wnid>/, val/, test/
VAL_SOLUTION = "LOC_val_solution.csv"
SYNSET_MAPPING = "LOC_synset_mapping.txt"
