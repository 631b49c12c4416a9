"""A BERT classifier that reads the mean of the last hidden states, as sentence encoders are trained."""

from __future__ import annotations

from typing import Any

import torch
from transformers.modeling_outputs import SequenceClassifierOutput
from transformers.models.bert import BertConfig, BertModel, BertPreTrainedModel


class MeanPoolingBertForSequenceClassification(BertPreTrainedModel):
    """BERT with its classifier on the attention-masked mean of the last hidden states.

    Sentence encoders such as all-MiniLM-L6-v2 are trained to be read this way; their
    first-token pooler output is mostly one direction common to every sentence, which a
    head trained for a few federated steps cannot separate. The weight names are BERT's
    (``bert.*``, ``classifier.*``; there is no pooler), so LoRA targets and PEFT adapters
    are the same as for ``BertForSequenceClassification``. Single-label classification only.
    """

    #: ``config.model_type`` values this head works with.
    model_types = ("bert",)

    def __init__(self, config: BertConfig) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bert = BertModel(config, add_pooling_layer=False)
        dropout = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = torch.nn.Dropout(dropout)
        self.classifier = torch.nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **_: Any,
    ) -> SequenceClassifierOutput:
        hidden = self.bert(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            inputs_embeds=inputs_embeds,
        ).last_hidden_state
        if attention_mask is None:
            attention_mask = torch.ones(hidden.shape[:2], device=hidden.device)
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        logits = self.classifier(self.dropout(pooled))
        loss = None if labels is None else torch.nn.functional.cross_entropy(logits, labels.view(-1))
        return SequenceClassifierOutput(loss=loss, logits=logits)
