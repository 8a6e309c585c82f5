"""BERT (Devlin et al., 2019): masked-LM + next-sentence pretraining, and fine-tuning.

Read from the bottom up: ``tokens`` (special tokens and ``[CLS] A [SEP] B [SEP]``) and ``corpus`` (the
built-in text of every task), ``model`` (the encoder and its heads), ``hf`` (Hugging Face folders),
``base`` (what both recipes share), then the recipes: ``pretrain`` (``bert-pretrain``) and ``finetune``
(``bert-finetune``, with its tasks in ``tasks`` and ``qa``). Nothing imports upwards.
"""

from tfkit.recipes.bert import finetune, pretrain  # noqa: F401  (they register the recipes)
