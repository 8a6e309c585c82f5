"""BERT (Devlin et al., 2019): masked-LM + next-sentence pretraining (``bert-pretrain``), and fine-tuning
(``bert-finetune``).

Start with ``model`` (the encoder, its positions and parts by name, and its heads), then the recipes'
hooks: ``pretrain`` (masking and sentence pairs) and ``finetune`` (a head on a pretrained encoder, with
its tasks in ``tasks`` and ``qa``), both on ``recipe`` (what they share: the tokenizer, encoding text
pairs, the attention example). Below them, ``data`` holds the special tokens, WordPiece and the
built-in corpora, and ``interop`` Hugging Face BERT folders, both ways. Nothing imports upwards.
"""

from tfkit.recipes.bert import finetune, pretrain  # noqa: F401  (they register the recipes)
