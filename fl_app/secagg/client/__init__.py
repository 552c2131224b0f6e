"""The ClientApp's side of secure aggregation: one handler per protocol stage.

This sub-package is the Flower-facing part of :mod:`fl_app.secagg` (it reads ``Message``
and ``Context``); the rest of the package stays Flower-free. Modules: :mod:`.state`
(``Context.state`` records, instruction fields, replies), :mod:`.identity` (signing
identity, effective policy), :mod:`.checks` (what a client verifies before it reveals
anything), :mod:`.key_stages` (stages 1, 2, 4, 5) and :mod:`.masked_input` (stage 3).

The server's driver (:mod:`strategies.secagg`) sends four ``train`` messages per round,
each marked ``fl-app.secagg-stage``. Stages 1 (advertise keys), 2 (share keys) and 4
(unmask) are handled here without importing torch: under deployment Flower starts a
fresh ClientApp process per message, and key exchange must not pay for a torch import.
Stage 3 (masked input) trains through the usual pipeline in :mod:`fl_app.client.app`
and uses :class:`~fl_app.secagg.client.masked_input.MaskedInputStage` for its encode and
mask stages.

Key pairs ahead of time. Stage 1 asks for ``fl-app.secagg.key-rounds`` = ``h`` rounds:
the client draws ``h`` independent pairs ``(c_sk, s_sk)``, one per round ``r, ...,
r + h - 1``, keeps the private keys in ``Context.state[KEYS_STATE_KEY]`` and returns the
``2h`` public keys. The server stores them, so a later round in which this client is
sampled skips stage 1 for it (and the whole stage-1 exchange when every sampled client
has keys): a round costs three message exchanges instead of four (two with share-ahead,
below). Each pair is used by
exactly one round: stage 2 of round ``r`` takes the pair of ``r`` out of the store and
deletes it together with every pair of an earlier round, so a replayed or repeated
stage 2 for ``r`` finds no key and is refused, and revealing one round's ``s_sk`` (the
server reconstructs it when the client drops after sharing) tells nothing about any
other round's keys. A new stage 1 replaces the whole store (this is how a restarted
server, which lost the public keys, starts over). With ``secagg.key_rounds=1`` nothing
is kept beyond the round it was drawn for.

Share-ahead. A stage-4 instruction may carry, under ``secagg-next``, the stage-2
instruction of the next round (the server knows the next cohort ahead and every member
holds its pair). The client answers this round's unmask first, then runs the next round's
stage 2 and returns its payload under the same key; refusing that part (wrong round,
missing pair) only leaves this client out of the next round. The next round then starts
at stage 3 with the session stage 2 saved.

Between stages the client's :class:`~fl_app.secagg.ClientSession` lives in
``Context.state[STATE_KEY]`` (a ConfigRecord of bytes: keys, self-mask seed, shares).
That state holds secrets: ``b_u``, ``s_sk_u`` and ``c_sk_u`` leave it as soon as the
masked input is built (stage 3), the shares it holds for its neighbours after stage 4;
the whole state is deleted whenever stage 1 or 2 of a new round arrives and whenever a
stage fails. Only secrets of rounds that have not happened yet outlive a round: the
store of future rounds' private keys and, under share-ahead, the next round's session
from its stage 2 on. None ever reaches a log or a checkpoint (Flower keeps
``Context.state`` in the SuperNode's memory).

The client decides its own safety parameters (docs/architecture.md, Rules): the round's
``(k, t)``, fractions and bits are checked at stage 2 against the site's floor
(:class:`~fl_app.client.policy.SitePolicy`, safe defaults without a policy file),
distributed DP's ``n_min`` and noise at stage 3, and at stage 4 the survivor and
dropout lists against the cohort received at stage 2 (ids outside it, duplicates and
neighbours that never shared are refused) and the survivors counted against the
client's own floor. A refusal by the policy carries the field it names
(:attr:`SecAggStageError.field`).

Malicious server model (``params.server_model``, :mod:`fl_app.secagg.signing`): stage
1 signs every advertised pair for the run id the instruction names; stage 2 requires
the complete graph (neighbours = the cohort less this client), thresholds with
``t > C`` and ``2t > n + C`` for this site's own colluder bound, and verifies each
neighbour's signature against this site's roster (each identity once) before any share
is encrypted; the consistency stage (5) checks and signs the survivor set once per
round, bound to this client's round keys; stage 4 reveals only for exactly that set
and :func:`~fl_app.secagg.params.consistency_quorum` valid signatures on it from distinct
roster identities of the cohort. The site's key and roster come from node config
``signing-key-path`` / ``roster-path`` (its key file private to its user and equal to
its roster entry; with either set, the site's minimum server model is ``malicious``
unless its policy names one); simulated partitions use the
:class:`~fl_app.secagg.signing.SimulationRoster`, only in a process a simulation entry
point marked.

Round monotonicity: ``Context.state[PROGRESS_STATE_KEY]`` records the latest round
this client took part in and the latest round it sent a masked input for. A stage for
an earlier round is refused, and so is stage 1, 2 or 3 of a round whose masked input
already left (a server cannot run one round twice, with and without a target client).
"""

from fl_app.secagg.client.identity import effective_policy
from fl_app.secagg.client.key_stages import handle_key_stage
from fl_app.secagg.client.masked_input import MaskedInputStage
from fl_app.secagg.client.state import (
    KEYS_STATE_KEY,
    PROGRESS_STATE_KEY,
    STATE_KEY,
    SecAggStageError,
    secagg_stage,
    wipe_state,
)

__all__ = [
    "KEYS_STATE_KEY",
    "PROGRESS_STATE_KEY",
    "STATE_KEY",
    "MaskedInputStage",
    "SecAggStageError",
    "effective_policy",
    "handle_key_stage",
    "secagg_stage",
    "wipe_state",
]
