"""Stage functions of the transfer study: prepare, pretrain, extract, finetune, compare."""
