"""Rankers on TorchRec tables: DCNv2 + DIN (the DLRM baseline), OneTrans, and the HSTU ranker.

All three read the same :class:`~torchrec_genrec.batch.RankingBatch`
through the same tables (:mod:`~torchrec_genrec.models.ranking.features`, the base class
:class:`Ranker`). They differ in how sequences and features meet:

- ``dlrm`` (:class:`~torchrec_genrec.models.ranking.dlrm.DLRMRanker`): DIN target
  attention over each behaviour sequence, DCNv2 (TorchRec's ``CrossNet``) + a deep MLP
  over the non-sequential features, concatenated into an MLP — sequence modelling and
  feature crossing kept apart;
- ``onetrans`` (:class:`~torchrec_genrec.models.ranking.onetrans.OneTransRanker`): one
  causal transformer over ``[S-tokens ; NS-tokens]`` (:mod:`torchrec_genrec.modules.onetrans`);
  the S side runs once per request (Stage I) and each candidate's NS tokens attend to its
  cached keys/values (Stage II);
- ``hstu`` (:class:`~torchrec_genrec.models.ranking.hstu.HSTURanker`): the user's merged
  history, then the candidates under a target-aware mask
  (:mod:`torchrec_genrec.modules.hstu_ranker`), with two task heads at the candidate
  positions (like = label, and the rating class): one pass scores all of a request's
  candidates.

Settings: :class:`RankerConfig` (``model``), with one config per architecture
(``model.dlrm``, ``model.onetrans``, ``model.hstu``).

See :class:`~torchrec_genrec.models.ranking.features.Ranker` for an example.
"""

from torchrec_genrec.models.ranking.config import DLRMConfig, HSTURankerConfig, OneTransRankerConfig, RankerConfig
from torchrec_genrec.models.ranking.features import NS_GROUPS, Ranker, count_dense_parameters, count_table_parameters
from torchrec_genrec.models.ranking.dlrm import DLRMRanker
from torchrec_genrec.models.ranking.hstu import HSTURanker
from torchrec_genrec.models.ranking.onetrans import OneTransRanker

__all__ = ["DLRMConfig", "DLRMRanker", "HSTURanker", "HSTURankerConfig", "NS_GROUPS", "OneTransRanker",
           "OneTransRankerConfig", "Ranker", "RankerConfig", "count_dense_parameters", "count_table_parameters"]
