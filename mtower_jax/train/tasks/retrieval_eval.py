"""Image-text retrieval evaluation (Flickr30K / COCO Karpathy splits; DESIGN.md section 3).

    ITC      every text and every image -> normalised 256-d ITC embeddings
    top k    chunked similarity on the device: IR  text rows  [text_chunk, N] -> top k images
                                               TR  image rows [text_chunk, M] -> top k texts
    ITM      the union of those (text, image) pairs, deduplicated, scored by the full
             cross-modal forward: score = itm_logits[:, 1] - itm_logits[:, 0]
    recall   IR (text -> images; gold: the text's own image) and TR (image -> texts; gold: any
             of its captions) Recall@1/5/10 over the re-ranked top k, and their mean

    evaluator = RetrievalEvaluator(config, model, mesh)   # under jax.set_mesh + axis rules
    metrics = evaluator.evaluate(params, "test")          # ir_r1 ... tr_r10, r_mean (percent)
    ranking = evaluator.rank(params, "test")              # candidates and scores of each query

Memory is bounded whatever the gallery size: the images are read twice, in order, through the
eval pipeline (one record = one image, `one_text_per_record`), and only one batch of image
encodings exists at a time. The host keeps the ITC embeddings ([N + M, 256] floats), the
tokenized captions, and per query its k candidate ids and k scores (no dense [M, N] matrix).

Cost for N images, M captions, re-ranking depth k, embedding width d:
    ITC similarity  O(N * M * d) FLOPs, chunked: O(text_chunk * max(N, M)) memory per step
    ITM re-ranking  O((N + M) * k) full cross-modal forwards (at most; shared pairs once)
    vision encoder  2N: once for the ITC embeddings, once when the image's ITM pairs run
    text encoder    M + (N + M) * k: once for ITC, then inside each ITM pair
The re-ranking dominates: COCO 5k test (N = 5,000, M = 25,000, k = 256) is <= 7.7M pair
forwards against 25M x 256 multiply-adds of similarity.

Recall with ties (`recall_at_k`): a query is a hit at K when some gold candidate g with a
finite score has fewer than K *non-gold* candidates scoring >= score(g). Ties count against
the model, so a constant scorer gets no credit at K smaller than the number of wrong
candidates; candidates outside the query's top k score -inf and are never hits.

Distinct jitted shapes: image ITC [B], text ITC [B], top-k (IR and TR gallery sizes), image
encoding [B] and ITM [pair_batch] - every call pads to those (B = config.eval_batch_size).
Multi-process: every process ends up with all embeddings (`evaluation.gather`), computes the
same pair list and runs the same number of steps; only images are read per process.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mtower_jax.data import pipeline
from mtower_jax.train import evaluation
from mtower_jax.train import mesh as mesh_lib

KS = (1, 5, 10)


def recall_at_k(scores: np.ndarray, gold: np.ndarray, ks=KS) -> dict:
    """{'r1': percent, 'r5': ..., ...} of queries that are hits at each K.

    scores [queries, candidates] float (-inf: not a candidate, e.g. outside the query's
    re-ranked top k); gold [queries, candidates] bool. A query is a hit at K when some gold
    candidate g with a finite score has fewer than K non-gold candidates scoring >= score(g):
    ties with wrong candidates count against the model. The best-scoring gold decides, so
    only one gold per query needs to be found (TR: any caption of the image). No queries
    gives 0.
    """
    scores = np.asarray(scores, np.float64)
    gold = np.asarray(gold, bool)
    if scores.shape != gold.shape or scores.ndim != 2:
        raise ValueError(f"scores {scores.shape} and gold {gold.shape} must be the same "
                         "[queries, candidates] shape")
    best_gold = np.max(np.where(gold, scores, -np.inf), axis=1, initial=-np.inf)  # [Q]
    wrong = np.where(gold, -np.inf, scores)
    ahead = np.sum(wrong >= best_gold[:, None], axis=1)  # wrong candidates tied or above
    found = np.isfinite(best_gold)
    queries = max(len(scores), 1)
    return {f"r{k}": float(100.0 * np.sum(found & (ahead < k)) / queries) for k in ks}


@dataclasses.dataclass
class Ranking:
    """The re-ranked candidates of every query of a split (-inf / -1: no candidate)."""
    text_image: np.ndarray  # [M] int: the image (record) of each caption
    image_seen: np.ndarray  # [N] bool: the image was read (a corrupt one is skipped)
    ir_images: np.ndarray  # [M, k] ITC top-k images of each text, in ITC order
    ir_itc: np.ndarray  # [M, k] their ITC similarities (dot of the normalised embeddings)
    ir_itm: np.ndarray  # [M, k] their ITM scores (logit 1 - logit 0)
    tr_texts: np.ndarray  # [N, k] ITC top-k texts of each image
    tr_itc: np.ndarray  # [N, k]
    tr_itm: np.ndarray  # [N, k]
    pairs_scored: int  # distinct (text, image) pairs run through ITM

    def metrics(self) -> dict:
        ir_gold = self.ir_images == self.text_image[:, None]
        tr_gold = self.text_image[np.maximum(self.tr_texts, 0)] == np.arange(
            len(self.tr_texts))[:, None]
        tr_gold &= self.tr_texts >= 0
        seen = self.image_seen  # an image that was never read asks no TR query
        ir = recall_at_k(self.ir_itm, ir_gold)
        tr = recall_at_k(self.tr_itm[seen], tr_gold[seen])
        out = {f"ir_{k}": v for k, v in ir.items()} | {f"tr_{k}": v for k, v in tr.items()}
        out["r_mean"] = float(np.mean(list(out.values())))
        return out | {"images": int(len(self.image_seen)), "texts": int(len(self.text_image))}


def _image_itc(module, pixels):
    """[B, S, S, 3] -> ITC image embeddings [B, 256]."""
    feats = module.backbone.encode_image(pixels, False)["outputs"][-1]
    no_text = jnp.zeros((feats.shape[0], 1, module.cfg.text.hidden_size), feats.dtype)
    return module.head("itc")({"unimodal_text_feats": no_text, "unimodal_image_feats": feats},
                              False)["itc_image_embeds"]


def _text_itc(module, input_ids, attention_mask):
    """[B, L] -> ITC text embeddings [B, 256]."""
    feats = module.backbone.encode_text(input_ids, attention_mask, False)["hidden_states"][-1]
    no_image = jnp.zeros((feats.shape[0], 1, module.cfg.vision.hidden_size), feats.dtype)
    return module.head("itc")({"unimodal_text_feats": feats, "unimodal_image_feats": no_image},
                              False)["itc_text_embeds"]


def _encode_images(module, pixels):
    """[B, S, S, 3] -> the vision outputs the cross-modal stack reads, [k, B, 1+P, Dv]."""
    return module.backbone.encode_image(pixels, False)["outputs"]


def _itm_scores(module, image_outputs, image_row, input_ids, attention_mask):
    """Pair p = (text input_ids[p], image image_outputs[:, image_row[p]]) -> ITM score [P]."""
    text = module.backbone.encode_text(input_ids, attention_mask, False)
    image = {"outputs": image_outputs[:, image_row], "hidden_states": ()}
    cls = jnp.zeros((input_ids.shape[0], 1), jnp.int32)  # the poolers read only [CLS]
    fused = module.backbone.fuse(text, attention_mask, image, False, text_positions=cls,
                                 image_positions=cls)
    logits = module.head("itm")(fused, False)["itm_logits"].astype(jnp.float32)
    return logits[:, 1] - logits[:, 0]


def _top_k(queries, gallery, gallery_valid, k: int):
    """Each query row's k most similar gallery rows: (values [C, k], indices [C, k])."""
    scores = jnp.dot(queries.astype(jnp.float32), gallery.astype(jnp.float32).T,
                     precision=jax.lax.Precision.HIGHEST)
    return jax.lax.top_k(jnp.where(gallery_valid[None, :], scores, -jnp.inf), k)


def _round_up(n: int, multiple: int) -> int:
    return max(multiple, -(-int(n) // multiple) * multiple)


def _pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
    """x with rows appended (copies of row 0) up to `rows`."""
    return np.concatenate([x, x[np.zeros(rows - len(x), np.int64)]]) if rows > len(x) else x


@dataclasses.dataclass
class _Split:
    images: object  # the split's image pipeline (iterable, re-read per pass)
    num_images: int
    input_ids: np.ndarray  # [M, L] every caption, in record order
    attention_mask: np.ndarray  # [M, L]
    text_image: np.ndarray  # [M]


class RetrievalEvaluator:
    """Jitted functions built once; each split's pipeline and captions loaded on first use.

    Call inside the run's mesh context (`jax.set_mesh(mesh)` and the logical axis rules).
    Reads config.retrieval.rerank_k / text_chunk / pair_batch, config.eval_batch_size.
    """

    def __init__(self, config: ml_collections.ConfigDict, model, mesh):
        datasets = tuple(config.data.datasets)
        if len(datasets) != 1:
            raise ValueError(f"retrieval evaluation ranks within one dataset's split, but "
                             f"config.data.datasets={datasets}; evaluate each dataset with "
                             "its own config (e.g. --config.data.datasets=f30k_retrieval,)")
        self.config, self.model, self.mesh = config, model, mesh
        shards = mesh.shape["data"] * mesh.shape["fsdp"]  # devices along the batch
        self.batch_size = evaluation.eval_batch_size(config)
        if self.batch_size % shards or self.batch_size % jax.process_count():
            raise ValueError(f"eval batch size {self.batch_size} is not divisible by the "
                             f"{shards} batch shards and {jax.process_count()} processes; "
                             "set config.eval_batch_size")
        retrieval = config.retrieval
        self.rerank_k = int(retrieval.rerank_k)
        if self.rerank_k < 1:
            raise ValueError(f"config.retrieval.rerank_k={self.rerank_k} must be >= 1")
        self.text_chunk = _round_up(retrieval.text_chunk, shards)
        self.pair_batch = _round_up(retrieval.pair_batch, shards)
        self._sharded = mesh_lib.batch_sharding(mesh)
        self._replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

        def apply(fn):
            return jax.jit(lambda params, *args: model.apply({"params": params}, *args,
                                                              method=fn))
        self._image_itc, self._text_itc = apply(_image_itc), apply(_text_itc)
        self._encode_images, self._itm_scores = apply(_encode_images), apply(_itm_scores)
        self._top_k = jax.jit(_top_k, static_argnums=3)
        self._splits = {}

    # -- data ---------------------------------------------------------------------------

    def _split(self, split: str) -> _Split:
        if split not in self._splits:
            config = self.config
            ((_, source, counts),) = pipeline.split_parts(config, "retrieval", split)
            counts = np.asarray(counts, np.int64)
            texts = []
            for record, count in enumerate(counts):
                captions = source[record]["texts"][:count]
                texts += [t.decode("utf-8") if isinstance(t, bytes) else str(t)
                          for t in captions]
            tokens = pipeline.tokenizer_for(config.data).encode_batch(
                texts, config.model.max_text_len)
            images = pipeline.task_data(config, "retrieval", split, train=False,
                                        batch_size=self.batch_size, one_text_per_record=True)
            self._splits[split] = _Split(
                images, len(counts), tokens["input_ids"], tokens["attention_mask"],
                np.repeat(np.arange(len(counts)), counts))
        return self._splits[split]

    def _image_batches(self, data: _Split):
        """Global batches of the split's images: (device batch, record [B], valid [B] bool)."""
        num_batches = math.ceil(data.num_images / self.batch_size)
        local = self.batch_size // jax.process_count()
        for batch in evaluation.padded_batches(iter(data.images), local, num_batches):
            batch = mesh_lib.global_batch(
                {k: batch[k] for k in ("pixel_values", "record_index", "valid")}, self.mesh)
            # Read back in global row order: the row of each record in the device batch.
            yield (batch, evaluation.gather(batch["record_index"]).astype(np.int64),
                   evaluation.gather(batch["valid"]) > 0)

    def _put(self, x: np.ndarray, sharded: bool = True) -> jax.Array:
        """A host array that every process holds whole -> global array (batch-sharded or
        replicated)."""
        x = np.asarray(x)
        return jax.make_array_from_callback(
            x.shape, self._sharded if sharded else self._replicated, lambda index: x[index])

    # -- the passes ---------------------------------------------------------------------

    def _image_embeddings(self, params, data: _Split) -> tuple[np.ndarray, np.ndarray]:
        """Pass 1 over the images: ITC embeddings [N, d] and which images were read [N]."""
        embeds, seen = None, np.zeros(data.num_images, bool)
        for batch, records, valid in self._image_batches(data):
            out = evaluation.gather(self._image_itc(params, batch["pixel_values"]))
            if embeds is None:
                embeds = np.zeros((data.num_images, out.shape[-1]), np.float32)
            embeds[records[valid]] = out[valid]
            seen[records[valid]] = True
        return embeds, seen

    def _text_embeddings(self, params, data: _Split) -> np.ndarray:
        """ITC embeddings of every caption [M, d], in chunks of the eval batch size."""
        num, size = len(data.input_ids), self.batch_size
        chunks = []
        for start in range(0, num, size):
            ids, mask = (_pad_rows(x[start:start + size], size)
                         for x in (data.input_ids, data.attention_mask))
            chunks.append(self._text_itc(params, self._put(ids), self._put(mask)))
        return np.concatenate([evaluation.gather(c) for c in chunks])[:num]

    def _ranked(self, queries: np.ndarray, gallery: np.ndarray, gallery_valid: np.ndarray,
                k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top k gallery rows of every query (values, indices), text_chunk queries per step."""
        gallery_dev = self._put(gallery, sharded=False)
        valid_dev = self._put(gallery_valid, sharded=False)
        outs = []
        for start in range(0, len(queries), self.text_chunk):
            chunk = _pad_rows(queries[start:start + self.text_chunk], self.text_chunk)
            outs.append(self._top_k(self._put(chunk), gallery_dev, valid_dev, k))
        values = np.concatenate([evaluation.gather(v) for v, _ in outs])[:len(queries)]
        indices = np.concatenate([evaluation.gather(i) for _, i in outs])[:len(queries)]
        return values, indices.astype(np.int64)

    def _itm_pass(self, params, data: _Split, pair_image: np.ndarray, pair_text: np.ndarray
                  ) -> np.ndarray:
        """Pass 2 over the images: the ITM score of every pair (sorted by image); each image
        batch is encoded once and its pairs run in pair_batch steps."""
        scores = np.full(len(pair_image), np.nan, np.float32)
        starts = np.searchsorted(pair_image, np.arange(data.num_images + 1))
        size = self.pair_batch
        for batch, records, valid in self._image_batches(data):
            rows = np.flatnonzero(valid)
            lo, hi = starts[records[rows]], starts[records[rows] + 1]
            if not np.any(hi > lo):
                continue  # no pair needs these images (same answer on every process)
            pairs = np.concatenate([np.arange(a, b) for a, b in zip(lo, hi)])
            row_of_pair = np.repeat(rows, hi - lo)
            encoded = self._encode_images(params, batch["pixel_values"])
            outs = []
            for start in range(0, len(pairs), size):
                index = pairs[start:start + size]
                texts = _pad_rows(pair_text[index], size)
                outs.append((index, self._itm_scores(
                    params, encoded, self._put(_pad_rows(row_of_pair[start:start + size], size)
                                               .astype(np.int32)),
                    self._put(data.input_ids[texts]), self._put(data.attention_mask[texts]))))
            for index, out in outs:
                scores[index] = evaluation.gather(out)[:len(index)]
        return scores

    # -- public -------------------------------------------------------------------------

    def rank(self, params, split: str) -> Ranking:
        """ITC top k of every query of `split`, re-ranked by ITM (see the module docstring)."""
        data = self._split(split)
        num_texts, num_images = len(data.text_image), data.num_images
        image_embeds, seen = self._image_embeddings(params, data)
        if image_embeds is None:
            raise ValueError(f"retrieval split {split!r} has no readable image")
        text_embeds = self._text_embeddings(params, data)
        k_ir, k_tr = min(self.rerank_k, num_images), min(self.rerank_k, num_texts)
        ir_itc, ir_images = self._ranked(text_embeds, image_embeds, seen, k_ir)
        tr_itc, tr_texts = self._ranked(image_embeds, text_embeds, np.ones(num_texts, bool),
                                        k_tr)
        tr_itc[~seen] = -np.inf  # an unread image has no embedding: no TR pairs
        ir_ok, tr_ok = np.isfinite(ir_itc), np.isfinite(tr_itc)
        ir_key = ir_images * num_texts + np.arange(num_texts)[:, None]  # image * M + text
        tr_key = np.arange(num_images)[:, None] * num_texts + tr_texts
        keys = np.unique(np.concatenate([ir_key[ir_ok], tr_key[tr_ok]]))  # sorted by image
        pair_scores = self._itm_pass(params, data, keys // num_texts, keys % num_texts)

        def lookup(key, ok):
            out = np.full(key.shape, -np.inf, np.float32)
            out[ok] = pair_scores[np.searchsorted(keys, key[ok])]
            return out
        return Ranking(
            text_image=data.text_image, image_seen=seen,
            ir_images=np.where(ir_ok, ir_images, -1), ir_itc=ir_itc,
            ir_itm=lookup(ir_key, ir_ok),
            tr_texts=np.where(tr_ok, tr_texts, -1), tr_itc=tr_itc,
            tr_itm=lookup(tr_key, tr_ok), pairs_scored=len(keys))

    def evaluate(self, params, split: str) -> dict:
        """{'ir_r1', 'ir_r5', 'ir_r10', 'tr_r1', 'tr_r5', 'tr_r10', 'r_mean'} in percent,
        plus 'images', 'texts', 'rerank_k' and 'pairs_scored'."""
        ranking = self.rank(params, split)
        return ranking.metrics() | {"rerank_k": self.rerank_k,
                                    "pairs_scored": ranking.pairs_scored}
