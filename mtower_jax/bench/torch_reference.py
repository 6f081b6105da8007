"""The PyTorch reference a user would otherwise train: HF `BridgeTowerForMaskedLM` plus a
`BridgeTowerITMHead` on its pooler, with the step of the BridgeTower / METER code:

    MLM pass   bridgetower(masked ids, pixels)          -> mlm_score -> CE at masked tokens
    ITM pass   bridgetower(ids, pixels with half of the batch's images swapped) -> itm_score
    loss = L_mlm + L_itm;  backward;  AdamW step

Two full forward passes: the images are encoded twice, as the reference does.
"""
from __future__ import annotations

import ml_collections
import numpy as np
import torch
import transformers
from transformers.models.bridgetower.modeling_bridgetower import BridgeTowerITMHead

from mtower_jax.convert.to_hf_bridgetower import hf_config


class TorchReference:
    """`step()` runs one training step on a fixed batch (numpy, our layout)."""

    def __init__(self, model_cfg: ml_collections.ConfigDict, batch: dict, *, lr: float,
                 seed: int = 0):
        torch.manual_seed(seed)
        config = transformers.BridgeTowerConfig(**hf_config(model_cfg))
        self.mlm_model = transformers.BridgeTowerForMaskedLM(config).train()
        self.itm_head = BridgeTowerITMHead(config.hidden_size * 2).train()
        params = list(self.mlm_model.parameters()) + list(self.itm_head.parameters())
        self.optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), eps=1e-8,
                                           weight_decay=0.01)
        self.generator = torch.Generator().manual_seed(seed)
        t = lambda x: torch.from_numpy(np.ascontiguousarray(x))
        self.pixels = t(batch["pixel_values"]).permute(0, 3, 1, 2).contiguous()  # NHWC -> NCHW
        self.input_ids = t(batch["input_ids"]).long()
        self.attention_mask = t(batch["attention_mask"]).long()
        self.mlm_input_ids = t(batch["mlm_input_ids"]).long()
        self.mlm_labels = t(batch["mlm_labels"]).long()  # IGNORE = -100, as HF ignores

    def _itm_images(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Half the examples (at random) get another example's image; labels 1 = matched."""
        batch = self.pixels.shape[0]
        matched = torch.rand(batch, generator=self.generator) < 0.5
        other = (torch.arange(batch) + torch.randint(1, batch, (batch,),
                                                     generator=self.generator)) % batch
        index = torch.where(matched, torch.arange(batch), other)
        return self.pixels[index], matched.long()

    def step(self) -> float:
        bridgetower = self.mlm_model.bridgetower
        mlm = self.mlm_model(input_ids=self.mlm_input_ids, attention_mask=self.attention_mask,
                             pixel_values=self.pixels, labels=self.mlm_labels)
        itm_pixels, itm_labels = self._itm_images()
        pooled = bridgetower(input_ids=self.input_ids, attention_mask=self.attention_mask,
                             pixel_values=itm_pixels).pooler_output
        itm_loss = torch.nn.functional.cross_entropy(self.itm_head(pooled), itm_labels)
        loss = mlm.loss + itm_loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

