// llama-mtp shim: a C surface over upstream common_speculative (type draft-mtp).
//
// Upstream aborts the process (GGML_ASSERT) or corrupts memory on bad input, so
// every entry point here checks what it can before calling upstream, keeps its
// own bookkeeping of the draft/verify/accept protocol per sequence, and turns
// every failure (C++ exceptions included) into a status code plus a message.

#include "llama.h"
#include "common.h"
#include "speculative.h"
#include "build-info.h"
#include "mtp_guard.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <random>
#include <cstdarg>
#include <cstdio>
#include <exception>
#include <map>
#include <memory>
#include <limits>
#include <mutex>
#include <string>
#include <vector>


// staging API of src/llama-ext.h (not installed; exported by libllama)
LLAMA_API void llama_set_embeddings_nextn(struct llama_context * ctx, bool value, bool masked);
LLAMA_API float * llama_get_embeddings_nextn(struct llama_context * ctx);
LLAMA_API float * llama_get_embeddings_nextn_ith(struct llama_context * ctx, int32_t i);
LLAMA_API void llama_set_nextn_layer_offset(struct llama_context * ctx, int32_t offset);
LLAMA_API llama_context * llama_get_ctx_other(struct llama_context * ctx);

namespace {

int64_t now_us() {
    return std::chrono::duration_cast<std::chrono::microseconds>(
        std::chrono::steady_clock::now().time_since_epoch()).count();
}

struct scoped_timer {
    int64_t & acc;
    int64_t   t0 = now_us();
    explicit scoped_timer(int64_t & a) : acc(a) {}
    ~scoped_timer() { acc += now_us() - t0; }
};

// Target contexts whose nextn output a live session switched on: switch it off
// again when the last session on that context goes away.
std::mutex g_targets_mu;
std::map<llama_context *, int> g_targets;

struct seq_state {
    bool    pending   = false; // a non-empty draft awaits accept()
    bool    own_draft = false; // the pending draft came from the own draft loop (draft_many)
    bool    upstream_drafted = false; // upstream's drafter has proposed for this seq at least once
    bool    verified  = false; // the verify batch for it went through process()
    int32_t last_len  = 0;     // length of the pending draft
    int32_t last_pos0 = 0;     // pos0 of the pending draft
    int32_t n_verify  = 0;     // rows of this seq in the last processed batch
};

// Draft-context decodes that process() deferred (defer_catchup): row i pairs token
// tok[i] at position pos[i] with the target's hidden state before it, h[i].
// An empty draft memory may restart anywhere, the rows (if any) being all the history it gets
// back; detached only marks that a forget emptied it (counted once per forget run in the stats).
struct deferred_rows {
    std::vector<llama_token> tok;
    std::vector<llama_pos>   pos;
    std::vector<float>       h;
    bool                     detached = false;

    size_t size() const { return tok.size(); }
    // the rows are gone into (or invalidated by a change of) the draft memory
    void clear() { tok.clear(); pos.clear(); h.clear(); detached = false; }
    void resize(size_t n, size_t n_embd) { tok.resize(n); pos.resize(n); h.resize(n * n_embd); }
    void drop_front(size_t n, size_t n_embd) {
        tok.erase(tok.begin(), tok.begin() + n);
        pos.erase(pos.begin(), pos.begin() + n);
        h.erase(h.begin(), h.begin() + n * n_embd);
    }
};

} // namespace

struct mtp_session {
    llama_context * tgt = nullptr;
    llama_context * dft = nullptr;

    int32_t n_seq       = 0;
    int32_t n_draft_max = 0;
    int32_t n_vocab     = 0;
    bool    rollback_bounded = false; // recurrent/hybrid target: seq_rm bounded by n_rs_seq
    int32_t mode    = MTP_MODE_SINGLE;  // upstream's draft mode for this pair (draft_mode())
    int32_t n_heads = 1;                // nextn layers of the draft model

    common_params_speculative params;
    common_speculative *      spec = nullptr;
    common_batch              cbatch;

    std::vector<seq_state>    seqs;
    llama_tokens              no_prompt; // upstream's draft params want a prompt; MTP ignores it
    llama_tokens              result;

    // mirror of upstream's per-seq hidden-state carry-over, for the session's own draft loop
    int32_t                         n_embd = 0;
    std::vector<std::vector<float>> pending_h; // [n_seq][n_embd]
    std::vector<std::vector<float>> verify_h;  // [n_seq][rows * n_embd]
    common_batch                    dbatch;    // on the draft context
    bool                            backend_sampling = false;
    bool                            defer_catchup    = false;
    std::vector<deferred_rows>      deferred;  // [n_seq]
    std::vector<std::pair<float, llama_token>> cand;
    std::vector<float>              weights;

    mtp_stats                 stats = {};
    std::vector<int64_t>      drafted_per_pos;
    std::vector<int64_t>      accepted_per_pos;

    std::mutex mu; // serialises concurrent calls on one session
};

namespace {

void check_session(mtp_session * s) {
    if (s == nullptr) {
        fail(MTP_ERR_NULL, "session handle is NULL");
    }
}

void check_seq(const mtp_session * s, int32_t seq_id) {
    if (seq_id < 0 || seq_id >= s->n_seq) {
        fail(MTP_ERR_SEQ, "seq_id %d is out of range: this session drafts for seq ids 0..%d (n_seq=%d)",
             seq_id, s->n_seq - 1, s->n_seq);
    }
}

llama_pos pos_max(llama_context * ctx, llama_seq_id seq) {
    return llama_memory_seq_pos_max(llama_get_memory(ctx), seq);
}

// Deferred rows are valid only as the continuation of the draft context's memory:
// drop them all if the caller changed that memory, and those at positions >= upto
// (rolled back, or about to be decoded again).
void sync_deferred(mtp_session * s, int32_t sid, llama_pos upto) {
    deferred_rows & d = s->deferred[sid];
    if (d.size() == 0) return;
    const llama_pos mem_max = pos_max(s->dft, sid);
    if (mem_max < 0) {
        // an empty memory: the rows restart it wherever they start, if the caller's start continues
        // them; rows it would skip past, or that all lie at or after it, are dropped
        if (upto > d.pos.back() + 1 || upto <= d.pos.front()) {
            d.resize(0, (size_t) s->n_embd);
            return;
        }
    } else if (mem_max != d.pos.front() - 1) {
        d.clear();
        return;
    }
    const int64_t keep = std::max<int64_t>(0, (int64_t) upto - d.pos.front());
    if (keep < (int64_t) d.size()) d.resize((size_t) keep, (size_t) s->n_embd);
}

// Last position the drafter will have seen on sid (decoded or deferred) once
// sync_deferred(s, sid, upto) has run; checks use it before changing anything.
llama_pos drafter_pos_max(mtp_session * s, int32_t sid, llama_pos upto) {
    const deferred_rows & d = s->deferred[sid];
    const llama_pos mem_max = pos_max(s->dft, sid);
    // an empty memory continues from anywhere (after a forget, or trimmed back to nothing after a
    // draft restarted it): drafts then see a shorter past, and the output is exact all the same
    if (mem_max < 0) return upto - 1;
    if (d.size() == 0 || mem_max != d.pos.front() - 1) return mem_max;
    return std::max(mem_max, std::min(d.pos.back(), upto - 1));
}

// Decode the deferred rows of sids on the draft context, in batches of n_batch, under
// every head that upstream's process() would decode them with. On failure the draft
// context is trimmed back and the rows stay deferred, so nothing changed.
void decode_deferred(mtp_session * s, const std::vector<int32_t> & sids);

// Upstream's mode choice (common_speculative_impl_draft_mtp's ctor), verbatim.
int32_t draft_mode(llama_context * tgt, llama_context * dft, int32_t * n_heads) {
    *n_heads = std::max(1, (int) llama_model_n_layer_nextn(llama_get_model(dft)));
    if (llama_get_ctx_other(dft) == tgt) return MTP_MODE_MEM_SHARED;
    return *n_heads > 1 ? MTP_MODE_CHAIN_HEADS : MTP_MODE_SINGLE;
}

bool chained(const mtp_session * s) { return s->mode == MTP_MODE_CHAIN_HEADS; }
bool shares_memory(const mtp_session * s) { return s->mode == MTP_MODE_MEM_SHARED; }

// Heads a catch-up row must be decoded under: each chained head attends over its own
// layer's KV, so upstream's process() decodes the catch-up batch once per head.
int32_t n_catchup_passes(const mtp_session * s) { return chained(s) ? s->n_heads : 1; }

// Before a chained head decodes positions >= from again: upstream drops them first
// (they may hold another head's rows) and selects the head's layer.
void select_head(mtp_session * s, const std::vector<std::pair<int32_t, llama_pos>> & rm_from, int32_t head) {
    if (!chained(s)) return;
    for (const auto & [sid, from] : rm_from) llama_memory_seq_rm(llama_get_memory(s->dft), sid, from, -1);
    llama_set_nextn_layer_offset(s->dft, head);
}

// upstream restores the default head after every multi-head pass
void reset_head(mtp_session * s) {
    if (chained(s)) llama_set_nextn_layer_offset(s->dft, 0);
}

void decode_deferred(mtp_session * s, const std::vector<int32_t> & sids) {
    std::vector<std::pair<int32_t, llama_pos>> rm_from;
    size_t n_rows = 0;
    for (int32_t sid : sids) {
        const deferred_rows & d = s->deferred[sid];
        if (d.size() == 0) continue;
        rm_from.push_back({ sid, d.pos.front() });
        n_rows += d.size();
    }
    if (n_rows == 0) return;
    const size_t n_per = std::max<size_t>(1, llama_n_batch(s->dft));
    bool ok = true;
    for (int32_t head = 0; head < n_catchup_passes(s) && ok; ++head) {
        select_head(s, rm_from, head);
        s->dbatch.clear();
        for (size_t k = 0; k < rm_from.size() && ok; ++k) {
            const int32_t sid = rm_from[k].first;
            const deferred_rows & d = s->deferred[sid];
            for (size_t i = 0; i < d.size() && ok; ++i) {
                const int32_t idx = s->dbatch.add(d.tok[i], d.pos[i], sid, false);
                s->dbatch.set_embd(idx, { d.h.data() + i * s->n_embd, 1, (size_t) s->n_embd });
                const bool last = k + 1 == rm_from.size() && i + 1 == d.size();
                if ((size_t) s->dbatch.size() == n_per || last) {
                    ok = llama_process(s->dft, LLAMA_PROCESS_TYPE_DECODE, s->dbatch.get()) == 0;
                    s->dbatch.clear();
                }
            }
        }
    }
    reset_head(s);
    if (!ok) {
        for (const auto & [sid, from] : rm_from) llama_memory_seq_rm(llama_get_memory(s->dft), sid, from, -1);
        fail(MTP_ERR_DECODE, "the draft context failed to decode %zu catch-up row(s) of %zu sequence(s)",
             n_rows, rm_from.size());
    }
    for (const auto & rf : rm_from) s->deferred[rf.first].clear();
}

void release_target(llama_context * tgt) {
    std::lock_guard<std::mutex> lock(g_targets_mu);
    auto it = g_targets.find(tgt);
    if (it == g_targets.end()) {
        return;
    }
    if (--it->second == 0) {
        g_targets.erase(it);
        llama_set_embeddings_nextn(tgt, false, false);
    }
}

} // namespace

MTP_EXPORT int32_t mtp_abi_version(void) {
    return MTP_ABI_VERSION;
}

MTP_EXPORT const char * mtp_last_error(void) {
    return g_last_error.c_str();
}

MTP_EXPORT const char * mtp_build_info(void) {
    return llama_build_info();
}

namespace {

// What mtp_session_new learns about the pair while checking it.
struct pair_shape {
    int32_t n_embd;           // hidden width, the same on both contexts
    int32_t n_vocab;          // vocabulary size, the same on both models
    bool    rollback_bounded; // recurrent/hybrid target
};

// The contexts and their models: one model with MTP heads behind a DEFAULT and an MTP context.
pair_shape check_pair(llama_context * ctx_tgt, llama_context * ctx_dft, const mtp_config * cfg) {
    if (ctx_tgt == ctx_dft) fail(MTP_ERR_INIT, "target and draft are the same context; the draft must be a separate MTP context");

    const llama_model * m_tgt = llama_get_model(ctx_tgt);
    const llama_model * m_dft = llama_get_model(ctx_dft);
    if (m_tgt == nullptr || m_dft == nullptr) fail(MTP_ERR_INIT, "context has no model");

    // llama.h has no getter for a context's type: the caller, who built the param structs, says
    if (cfg->ctx_type_tgt != LLAMA_CONTEXT_TYPE_DEFAULT) {
        fail(MTP_ERR_INIT, "the target context is not a DEFAULT context (is it the MTP context? pass target first, draft second)");
    }
    if (cfg->ctx_type_dft != LLAMA_CONTEXT_TYPE_MTP) {
        fail(MTP_ERR_INIT, "the draft context is not an MTP context: create it with ctx_type = LLAMA_CONTEXT_TYPE_MTP on the target's model (llama_mtp.load does this)");
    }
    if (llama_model_n_layer_nextn(m_dft) <= 0) {
        fail(MTP_ERR_INIT, "the draft model has no MTP (nextn) layers; use a model that ships MTP heads");
    }
    const int32_t n_embd_tgt = llama_model_n_embd_out(m_tgt);
    const int32_t n_embd_dft = llama_model_n_embd_out(m_dft);
    if (n_embd_tgt != n_embd_dft) {
        fail(MTP_ERR_INIT, "hidden widths differ: target n_embd_out=%d, draft n_embd_out=%d; the MTP context must belong to the target's model",
             n_embd_tgt, n_embd_dft);
    }
    const int32_t n_vocab_tgt = llama_vocab_n_tokens(llama_model_get_vocab(m_tgt));
    const int32_t n_vocab_dft = llama_vocab_n_tokens(llama_model_get_vocab(m_dft));
    if (n_vocab_tgt != n_vocab_dft) {
        fail(MTP_ERR_INIT, "vocabularies differ: target %d tokens, draft %d tokens", n_vocab_tgt, n_vocab_dft);
    }
    if (llama_get_memory(ctx_tgt) == nullptr || llama_get_memory(ctx_dft) == nullptr) {
        fail(MTP_ERR_INIT, "a context has no memory (embedding-only context?)");
    }
    return { n_embd_tgt, n_vocab_tgt, llama_model_is_recurrent(m_tgt) || llama_model_is_hybrid(m_tgt) };
}

// The config's sizes against the contexts: every batch the session builds must fit.
void check_sizes(llama_context * ctx_tgt, llama_context * ctx_dft, const mtp_config * cfg) {
    if (cfg->n_seq < 1) fail(MTP_ERR_ARG, "n_seq must be >= 1 (got %d)", cfg->n_seq);
    if ((uint32_t) cfg->n_seq > llama_n_seq_max(ctx_tgt) || (uint32_t) cfg->n_seq > llama_n_seq_max(ctx_dft)) {
        fail(MTP_ERR_ARG, "n_seq=%d exceeds the contexts' n_seq_max (target %u, draft %u)",
             cfg->n_seq, llama_n_seq_max(ctx_tgt), llama_n_seq_max(ctx_dft));
    }
    if (cfg->n_draft_max < 1) fail(MTP_ERR_ARG, "n_draft_max must be >= 1 (got %d)", cfg->n_draft_max);
    if (cfg->n_draft_max > 65535) fail(MTP_ERR_ARG, "n_draft_max must be <= 65535 (got %d)", cfg->n_draft_max);
    if ((uint32_t) cfg->n_draft_max + 1 > llama_n_batch(ctx_tgt)) {
        fail(MTP_ERR_ARG, "n_draft_max=%d needs a verify batch of %d tokens but the target's n_batch is %u",
             cfg->n_draft_max, cfg->n_draft_max + 1, llama_n_batch(ctx_tgt));
    }
    if ((uint32_t) cfg->n_seq * (uint32_t) (cfg->n_draft_max + 1) > llama_n_batch(ctx_dft)) {
        fail(MTP_ERR_ARG, "draft context n_batch=%u is too small for n_seq=%d x (n_draft_max+1)=%d",
             llama_n_batch(ctx_dft), cfg->n_seq, cfg->n_draft_max + 1);
    }
    if (cfg->n_min < 0 || cfg->n_min > cfg->n_draft_max) {
        fail(MTP_ERR_ARG, "n_min must be in [0, n_draft_max=%d] (got %d)", cfg->n_draft_max, cfg->n_min);
    }
    if (!(cfg->p_min >= 0.0f && cfg->p_min <= 1.0f)) {
        fail(MTP_ERR_ARG, "p_min must be in [0, 1] (got %g)", (double) cfg->p_min);
    }
}

// The pair's draft mode, refused where the config needs the own draft loop and the loop
// does not implement the mode.
int32_t check_mode(llama_context * ctx_tgt, llama_context * ctx_dft, const mtp_config * cfg, int32_t * n_heads) {
    if (cfg->defer_catchup && cfg->backend_sampling) {
        fail(MTP_ERR_ARG, "defer_catchup needs backend_sampling=0 (deferred rows are decoded by the own draft loop, mtp_session_draft_many, which reads the draft logits)");
    }
    const int32_t mode = draft_mode(ctx_tgt, ctx_dft, n_heads);
    if (mode == MTP_MODE_MEM_SHARED && cfg->defer_catchup) {
        fail(MTP_ERR_INIT, "the draft context shares the target's KV (is_mem_shared: a gemma4 assistant), a mode the session's own draft loop does not implement: create the session with defer_catchup=0 and draft with upstream's drafter (mtp_session_draft)");
    }
    return mode;
}

// Upstream's drafter on the pair (type draft-mtp), with the config's draft parameters.
void init_upstream(mtp_session * s, const mtp_config * cfg) {
    s->params.types                  = { COMMON_SPECULATIVE_TYPE_DRAFT_MTP };
    s->params.draft.n_max            = cfg->n_draft_max;
    s->params.draft.n_min            = cfg->n_min;
    s->params.draft.p_min            = cfg->p_min;
    s->params.draft.backend_sampling = cfg->backend_sampling != 0;
    s->params.draft.ctx_tgt          = s->tgt;
    s->params.draft.ctx_dft          = s->dft;

    s->spec = common_speculative_init(s->params, (uint32_t) cfg->n_seq);
    if (s->spec == nullptr) {
        fail(MTP_ERR_INIT, "upstream common_speculative_init returned no drafter");
    }
}

// A session on a checked pair; the caller registers it on the target once it is built.
std::unique_ptr<mtp_session> make_session(llama_context * ctx_tgt, llama_context * ctx_dft, const mtp_config * cfg,
                                          const pair_shape & shape, int32_t mode, int32_t n_heads) {
    auto s = std::make_unique<mtp_session>();
    s->tgt         = ctx_tgt;
    s->dft         = ctx_dft;
    s->n_seq       = cfg->n_seq;
    s->n_draft_max = cfg->n_draft_max;
    s->n_vocab     = shape.n_vocab;
    s->rollback_bounded = shape.rollback_bounded;
    s->mode    = mode;
    s->n_heads = n_heads;
    init_upstream(s.get(), cfg);
    s->cbatch = common_batch(ctx_tgt);
    s->dbatch = common_batch(ctx_dft);
    s->n_embd = shape.n_embd;
    s->backend_sampling = cfg->backend_sampling != 0;
    s->defer_catchup    = cfg->defer_catchup != 0;
    s->deferred.assign(cfg->n_seq, deferred_rows{});
    s->pending_h.assign(cfg->n_seq, std::vector<float>(shape.n_embd, 0.0f));
    s->verify_h.assign(cfg->n_seq, {});
    s->seqs.assign(cfg->n_seq, seq_state{});
    s->result.reserve(cfg->n_draft_max);
    s->drafted_per_pos.assign(cfg->n_draft_max, 0);
    s->accepted_per_pos.assign(cfg->n_draft_max, 0);
    return s;
}

} // namespace

MTP_EXPORT int32_t mtp_session_new(llama_context * ctx_tgt, llama_context * ctx_dft,
                                   const mtp_config * cfg, mtp_session ** out) {
    return guarded([&] {
        if (out == nullptr) fail(MTP_ERR_NULL, "out pointer is NULL");
        *out = nullptr;
        if (ctx_tgt == nullptr) fail(MTP_ERR_NULL, "target context is NULL");
        if (ctx_dft == nullptr) fail(MTP_ERR_NULL, "draft context is NULL");
        if (cfg == nullptr)     fail(MTP_ERR_NULL, "config is NULL");
        const pair_shape shape = check_pair(ctx_tgt, ctx_dft, cfg);
        check_sizes(ctx_tgt, ctx_dft, cfg);
        int32_t n_heads = 1;
        const int32_t mode = check_mode(ctx_tgt, ctx_dft, cfg, &n_heads);
        auto s = make_session(ctx_tgt, ctx_dft, cfg, shape, mode, n_heads);
        {
            std::lock_guard<std::mutex> lock(g_targets_mu);
            g_targets[ctx_tgt]++;
        }
        *out = s.release();
    });
}

MTP_EXPORT int32_t mtp_session_free(mtp_session * s) {
    return guarded([&] {
        if (s == nullptr) {
            return;
        }
        {
            std::lock_guard<std::mutex> lock(s->mu);
            common_speculative_free(s->spec);
            s->spec = nullptr;
            s->cbatch = common_batch();
            s->dbatch = common_batch();
            release_target(s->tgt);
        }
        delete s;
    });
}

MTP_EXPORT int32_t mtp_session_begin(mtp_session * s, int32_t seq_id, const int32_t * tokens, int32_t n_tokens) {
    return guarded([&] {
        check_session(s);
        std::lock_guard<std::mutex> lock(s->mu);
        check_seq(s, seq_id);
        if (n_tokens < 0) fail(MTP_ERR_ARG, "n_tokens must be >= 0 (got %d)", n_tokens);
        if (n_tokens > 0 && tokens == nullptr) fail(MTP_ERR_NULL, "tokens is NULL but n_tokens=%d", n_tokens);
        for (int32_t i = 0; i < n_tokens; ++i) {
            if (tokens[i] < 0 || tokens[i] >= s->n_vocab) {
                fail(MTP_ERR_ARG, "token %d at index %d is outside the vocabulary [0, %d)", tokens[i], i, s->n_vocab);
            }
        }
        if (!s->defer_catchup) { // upstream's drafter is unused then, and would warn about deferred rows
            const llama_tokens prompt(tokens, tokens + n_tokens);
            common_speculative_begin(s->spec, seq_id, prompt);
        } else {
            // a new sequence continues what the target holds of the slot (a reused prefix): deferred
            // rows past it are the last occupant's tail (kept by a forget), which a later catch-up
            // decode would otherwise put into the draft memory ahead of the new prefill
            sync_deferred(s, seq_id, pos_max(s->tgt, seq_id) + 1);
        }
        s->seqs[seq_id] = seq_state{};
    });
}

namespace {

// Each sequence's run of rows in a processed batch: [first[sid], last[sid]], -1 if absent.
struct seq_runs {
    std::vector<int32_t> first;
    std::vector<int32_t> last;
};

// What process() can check on the batch alone, before reading its rows.
void check_process_batch(const mtp_session * s, const llama_batch * batch) {
    if (batch == nullptr) fail(MTP_ERR_NULL, "batch is NULL");
    const int32_t n = batch->n_tokens;
    if (n <= 0) fail(MTP_ERR_PROCESS, "the batch is empty (n_tokens=%d); pass the batch that was just decoded on the target", n);
    if ((uint32_t) n > llama_n_batch(s->tgt)) {
        fail(MTP_ERR_PROCESS, "the batch has %d tokens, more than the target's n_batch=%u: it cannot be the batch the target just decoded",
             n, llama_n_batch(s->tgt));
    }
    if (batch->token == nullptr) fail(MTP_ERR_PROCESS, "embedding-only batches cannot be drafted from (batch.token is NULL)");
    if (batch->pos == nullptr)   fail(MTP_ERR_PROCESS, "batch.pos is NULL: MTP needs explicit positions");
    if (llama_get_embeddings_nextn(s->tgt) == nullptr) {
        fail(MTP_ERR_PROCESS, "the target has produced no hidden states yet: decode the batch on the target (after creating the session) before process()");
    }
}

// The seq ids of batch row i, each checked against the session's range.
void row_seq_ids(const mtp_session * s, const llama_batch * batch, int32_t i, std::vector<llama_seq_id> & ids) {
    ids.clear();
    const int32_t n_ids = batch->n_seq_id ? batch->n_seq_id[i] : 1;
    if (n_ids < 1) fail(MTP_ERR_PROCESS, "token at index %d has n_seq_id=%d", i, n_ids);
    for (int32_t j = 0; j < n_ids; ++j) {
        const llama_seq_id sid = (batch->seq_id && batch->seq_id[i]) ? batch->seq_id[i][j] : 0;
        if (sid < 0 || sid >= s->n_seq) {
            fail(MTP_ERR_SEQ, "token at index %d belongs to seq_id %d, outside this session's 0..%d (n_seq=%d)",
                 i, sid, s->n_seq - 1, s->n_seq);
        }
        ids.push_back(sid);
    }
}

// Each sequence's run in the batch, checked row by row: upstream assumes each sequence's
// tokens are contiguous and consecutive. Without defer_catchup the rows also go into the
// session's cbatch, the copy upstream's process() reads.
seq_runs scan_batch(mtp_session * s, const llama_batch * batch) {
    const int32_t n = batch->n_tokens;
    seq_runs runs { std::vector<int32_t>(s->n_seq, -1), std::vector<int32_t>(s->n_seq, -1) };
    s->cbatch.clear();
    std::vector<llama_seq_id> ids;
    for (int32_t i = 0; i < n; ++i) {
        const llama_token tok = batch->token[i];
        if (tok < 0 || tok >= s->n_vocab) {
            fail(MTP_ERR_PROCESS, "token %d at index %d is outside the vocabulary [0, %d)", tok, i, s->n_vocab);
        }
        row_seq_ids(s, batch, i, ids);
        const llama_seq_id sid = ids[0];
        if (runs.first[sid] < 0) {
            runs.first[sid] = i;
        } else if (runs.last[sid] != i - 1) {
            fail(MTP_ERR_PROCESS, "tokens of seq_id %d are not contiguous in the batch (index %d)", sid, i);
        } else if (batch->pos[i] != batch->pos[i - 1] + 1) {
            fail(MTP_ERR_PROCESS, "positions of seq_id %d are not consecutive at index %d (%d after %d)",
                 sid, i, batch->pos[i], batch->pos[i - 1]);
        }
        runs.last[sid] = i;
        if (!s->defer_catchup) { // upstream's process() reads it; a deferring session records rows instead
            const bool output = batch->logits ? batch->logits[i] != 0 : i == n - 1;
            s->cbatch.add(tok, batch->pos[i], ids, output);
        }
    }
    return runs;
}

// Every run must continue both the target (it was just decoded there) and what the drafter saw.
void check_runs_continue(mtp_session * s, const llama_batch * batch, const seq_runs & runs) {
    for (int32_t sid = 0; sid < s->n_seq; ++sid) {
        if (runs.first[sid] < 0) continue;
        const llama_pos p_first = batch->pos[runs.first[sid]];
        const llama_pos p_last  = batch->pos[runs.last[sid]];
        const llama_pos tgt_max = pos_max(s->tgt, sid);
        if (tgt_max != p_last) {
            fail(MTP_ERR_PROCESS, "seq_id %d: the batch ends at position %d but the target holds positions up to %d: pass the batch that was just decoded on the target",
                 sid, p_last, tgt_max);
        }
        // deferred rows the batch decodes again are replaced, so with defer_catchup a
        // rollback needs no trim of the draft context and processing twice is harmless
        const llama_pos dft_max = drafter_pos_max(s, sid, p_first);
        if (!shares_memory(s) && dft_max != p_first - 1) {
            fail(MTP_ERR_PROCESS, "seq_id %d: the batch starts at position %d but the drafter has seen positions up to %d: every target decode must go through process() exactly once, in order",
                 sid, p_first, dft_max);
        }
    }
}

// defer_catchup: record what upstream's process() would decode: token p with the hidden state after p-1.
void record_deferred(mtp_session * s, const llama_batch * batch, const seq_runs & runs) {
    for (int32_t sid = 0; sid < s->n_seq; ++sid) {
        if (runs.first[sid] < 0) continue;
        deferred_rows & d = s->deferred[sid];
        for (int32_t i = runs.first[sid]; i <= runs.last[sid]; ++i) {
            const float * h = i == runs.first[sid] ? s->pending_h[sid].data()
                                                   : llama_get_embeddings_nextn_ith(s->tgt, i - 1);
            if (h == nullptr) fail(MTP_ERR_INTERNAL, "the target has no hidden state for batch row %d", i - 1);
            d.tok.push_back(batch->token[i]);
            d.pos.push_back(batch->pos[i]);
            d.h.insert(d.h.end(), h, h + s->n_embd);
        }
    }
}

// Keep the target's hidden states of each run, the rows upstream keeps: row i is the state
// after batch token first+i; accept() picks the one after the last accepted token.
void keep_verify_rows(mtp_session * s, const seq_runs & runs) {
    const size_t row_bytes = (size_t) s->n_embd * sizeof(float);
    for (int32_t sid = 0; sid < s->n_seq; ++sid) {
        if (runs.first[sid] < 0) continue;
        seq_state & st = s->seqs[sid];
        st.n_verify = runs.last[sid] - runs.first[sid] + 1;
        auto & rows = s->verify_h[sid];
        rows.resize((size_t) st.n_verify * s->n_embd);
        for (int32_t i = 0; i < st.n_verify; ++i) {
            const float * h = llama_get_embeddings_nextn_ith(s->tgt, runs.first[sid] + i);
            if (h == nullptr) fail(MTP_ERR_INTERNAL, "the target has no hidden state for batch row %d", runs.first[sid] + i);
            std::memcpy(rows.data() + (size_t) i * s->n_embd, h, row_bytes);
        }
        std::memcpy(s->pending_h[sid].data(), rows.data() + (size_t) (st.n_verify - 1) * s->n_embd, row_bytes);
        if (st.pending) {
            st.verified = true;
        }
        // a long run (prompt) gains nothing from waiting: decode it now, keep memory small
        if (s->defer_catchup && s->deferred[sid].size() >= (size_t) llama_n_ubatch(s->dft)) {
            decode_deferred(s, { sid });
        }
    }
}

} // namespace

MTP_EXPORT int32_t mtp_session_process(mtp_session * s, const llama_batch * batch) {
    return guarded([&] {
        check_session(s);
        std::lock_guard<std::mutex> lock(s->mu);
        scoped_timer timer(s->stats.t_process_us);
        check_process_batch(s, batch);
        const seq_runs runs = scan_batch(s, batch);
        check_runs_continue(s, batch, runs);
        for (int32_t sid = 0; sid < s->n_seq; ++sid) {
            if (runs.first[sid] >= 0) sync_deferred(s, sid, batch->pos[runs.first[sid]]); // every check passed
        }
        if (s->defer_catchup) {
            record_deferred(s, batch, runs);
        } else if (!common_speculative_process(s->spec, s->cbatch)) {
            fail(MTP_ERR_DECODE, "the draft context failed to decode the batch (see llama.cpp log)");
        }
        keep_verify_rows(s, runs);
        s->stats.n_process_calls++;
        s->stats.n_process_tokens += batch->n_tokens;
    });
}

namespace {

// Checks shared by both draft paths; returns the effective n_max.
int32_t check_draft(mtp_session * s, int32_t seq_id, int32_t pos0, int32_t id_last, int32_t n_max,
                    const int32_t * out, int32_t * inout_n) {
    check_seq(s, seq_id);
    if (out == nullptr || inout_n == nullptr) fail(MTP_ERR_NULL, "output buffer or its length is NULL");
    const int32_t capacity = *inout_n;
    *inout_n = 0;
    if (capacity < s->n_draft_max) {
        fail(MTP_ERR_ARG, "output capacity %d is smaller than n_draft_max=%d", capacity, s->n_draft_max);
    }
    const seq_state & st = s->seqs[seq_id];
    if (st.pending) {
        fail(MTP_ERR_PROTOCOL, "seq_id %d has a pending draft of %d tokens: call accept() (0..%d) before drafting again",
             seq_id, st.last_len, st.last_len);
    }
    if (n_max < 0) n_max = s->n_draft_max;
    if (n_max > s->n_draft_max) fail(MTP_ERR_ARG, "n_max=%d exceeds the session's n_draft_max=%d", n_max, s->n_draft_max);
    if (id_last < 0 || id_last >= s->n_vocab) {
        fail(MTP_ERR_ARG, "id_last=%d is outside the vocabulary [0, %d)", id_last, s->n_vocab);
    }
    if (pos0 < 0) fail(MTP_ERR_ARG, "pos0 must be >= 0 (got %d)", pos0);
    const llama_pos tgt_max = pos_max(s->tgt, seq_id);
    // a drafter on the target's own KV (is_mem_shared) keeps no positions of its own
    const llama_pos dft_max = shares_memory(s) ? pos0 - 1 : drafter_pos_max(s, seq_id, pos0);
    if (tgt_max != pos0 - 1 || dft_max != pos0 - 1) {
        fail(MTP_ERR_ARG, "seq_id %d: pos0=%d must be the number of tokens in the context (target holds up to %d, drafter up to %d): pass n_past and hand every decode to process()",
             seq_id, pos0, tgt_max, dft_max);
    }
    const int64_t n_ctx_seq = (int64_t) llama_n_ctx_seq(s->tgt);
    if ((int64_t) pos0 + n_max >= n_ctx_seq) {
        fail(MTP_ERR_ARG, "a draft of %d tokens at pos0=%d would overrun the context (n_ctx per sequence %lld): pass a smaller n_max",
             n_max, pos0, (long long) n_ctx_seq);
    }
    return n_max;
}

// After either draft path: drop what drafting wrote, record the proposal.
void finish_draft(mtp_session * s, int32_t seq_id, int32_t pos0, int32_t n, bool own) {
    // the verify decode re-feeds these positions (a shared KV is the target's: upstream leaves it)
    if (!shares_memory(s)) llama_memory_seq_rm(llama_get_memory(s->dft), seq_id, pos0, -1);
    if (n <= 0) {
        return;
    }
    seq_state & st = s->seqs[seq_id];
    st.pending   = true;
    st.verified  = false;
    st.own_draft = own;
    st.upstream_drafted = st.upstream_drafted || !own;
    st.last_len  = n;
    st.last_pos0 = pos0;
    s->stats.n_drafts++;
    s->stats.n_drafted += n;
    for (int32_t i = 0; i < n; ++i) s->drafted_per_pos[i]++;
}

} // namespace

MTP_EXPORT int32_t mtp_session_draft(mtp_session * s, int32_t seq_id, int32_t pos0, int32_t id_last,
                                     int32_t n_max, int32_t * out, int32_t * inout_n) {
    return guarded([&] {
        check_session(s);
        std::lock_guard<std::mutex> lock(s->mu);
        scoped_timer timer(s->stats.t_draft_us);
        if (s->defer_catchup) {
            fail(MTP_ERR_ARG, "this session defers catch-up decodes (defer_catchup=1), which upstream's drafter cannot see: draft with the own draft loop (mtp_session_draft_many; MtpSession.draft_dist or draft_many)");
        }
        n_max = check_draft(s, seq_id, pos0, id_last, n_max, out, inout_n);
        s->stats.n_draft_calls++;
        if (n_max == 0) {
            return;
        }
        s->result.clear();
        common_speculative_get_draft_params(s->spec, seq_id) = {
            /* .drafting = */ true,
            /* .n_max    = */ n_max,
            /* .pos0     = */ pos0,
            /* .id_last  = */ id_last,
            /* .prompt   = */ &s->no_prompt,
            /* .result   = */ &s->result,
        };
        common_speculative_draft(s->spec);
        const int32_t n = std::min<int32_t>((int32_t) s->result.size(), n_max);
        std::copy(s->result.begin(), s->result.begin() + n, out);
        *inout_n = n;
        finish_draft(s, seq_id, pos0, n, /*own=*/ false);
    });
}

namespace {

// One draft row's pick from the MTP logits: the argmax at temp 0, else a sample from
// q = softmax(top_k logits / temp). Writes q (NULL: skipped); -1 when upstream's p_min
// confidence cut stops the draft here.
llama_token pick_draft_token(mtp_session * s, const float * logits, float temp, int32_t top_k,
                             std::mt19937 & rng, float * q_row) {
    if (temp == 0.0f && s->params.draft.p_min <= 0.0f) {
        // greedy without a confidence cut: the argmax is all that is needed
        const llama_token pick = (llama_token) (std::max_element(logits, logits + s->n_vocab) - logits);
        if (q_row) {
            std::fill(q_row, q_row + s->n_vocab, 0.0f);
            q_row[pick] = 1.0f;
        }
        return pick;
    }
    const int32_t k_cand = std::min(top_k, s->n_vocab);
    auto & cand = s->cand;
    cand.resize(s->n_vocab);
    for (int32_t v = 0; v < s->n_vocab; ++v) cand[v] = { logits[v], v };
    std::partial_sort(cand.begin(), cand.begin() + k_cand, cand.end(),
                      [](const auto & a, const auto & b) { return a.first > b.first; });
    // upstream's p_min uses the softmax over its top-10 candidates at temperature 1
    float z10 = 0.0f;
    for (int32_t c = 0; c < std::min(k_cand, 10); ++c) z10 += std::exp(cand[c].first - cand[0].first);
    if (1.0f / z10 < s->params.draft.p_min) {
        return -1;
    }
    llama_token pick = cand[0].second;
    if (q_row) std::fill(q_row, q_row + s->n_vocab, 0.0f);
    if (temp > 0.0f) {
        auto & w = s->weights;
        w.resize(k_cand);
        float z = 0.0f;
        for (int32_t c = 0; c < k_cand; ++c) {
            w[c] = std::exp((cand[c].first - cand[0].first) / temp);
            z += w[c];
        }
        std::uniform_real_distribution<float> unif(0.0f, 1.0f);
        const float u = unif(rng) * z;
        float acc = 0.0f;
        pick = cand[k_cand - 1].second; // rounding: u may reach z
        for (int32_t c = 0; c < k_cand; ++c) {
            acc += w[c];
            if (u < acc) {
                pick = cand[c].second;
                break;
            }
        }
        if (q_row) {
            for (int32_t c = 0; c < k_cand; ++c) q_row[cand[c].second] = w[c] / z;
        }
    } else if (q_row) {
        q_row[pick] = 1.0f;
    }
    return pick;
}

// Every check of a draft_many call, before anything changes; fixes each request's n_max.
void check_draft_reqs(mtp_session * s, mtp_draft_req * reqs, int32_t n_reqs) {
    if (n_reqs < 0) fail(MTP_ERR_ARG, "n_reqs must be >= 0 (got %d)", n_reqs);
    if (n_reqs > 0 && reqs == nullptr) fail(MTP_ERR_NULL, "reqs is NULL but n_reqs=%d", n_reqs);
    if (s->backend_sampling) {
        fail(MTP_ERR_ARG, "the own draft loop reads the draft logits: create the session with backend_sampling=0");
    }
    std::vector<char> seen(s->n_seq, 0);
    for (int32_t r = 0; r < n_reqs; ++r) {
        mtp_draft_req & q = reqs[r];
        int32_t capacity = s->n_draft_max; // out's capacity is n_draft_max by contract
        q.n_max = check_draft(s, q.seq_id, q.pos0, q.id_last, q.n_max, q.out, &capacity);
        if (seen[q.seq_id]) fail(MTP_ERR_ARG, "seq_id %d appears twice in one draft_many call", q.seq_id);
        seen[q.seq_id] = 1;
        if (q.top_k < 1) fail(MTP_ERR_ARG, "top_k must be >= 1 (got %d)", q.top_k);
        if (!(q.temp >= 0.0f) || !std::isfinite(q.temp)) fail(MTP_ERR_ARG, "temp must be a finite number >= 0");
        // upstream caps chained drafts at one position per trained head
        if (chained(s)) q.n_max = std::min(q.n_max, s->n_heads);
    }
    if (s->mode == MTP_MODE_MEM_SHARED) {
        fail(MTP_ERR_ARG, "the own draft loop does not implement the is_mem_shared mode (gemma4 assistant): draft with mtp_session_draft");
    }
}

// Decode deferred rows ahead of the draft loop where its first decode cannot take them.
void catch_up_before_drafting(mtp_session * s, const mtp_draft_req * reqs, int32_t n_reqs) {
    // the first decode holds every drafting sequence's deferred rows plus one row each:
    // catch sequences up on their own while that would not fit one batch
    const size_t n_batch = std::max<size_t>(1, llama_n_batch(s->dft));
    size_t n_first = 0;
    for (int32_t r = 0; r < n_reqs; ++r) {
        if (reqs[r].n_max > 0) n_first += s->deferred[reqs[r].seq_id].size() + 1;
    }
    if (chained(s)) {
        // every head needs the rows in its own layer's KV before the draft region is built
        // head by head: decode them under each head, as upstream's process() does
        std::vector<int32_t> sids;
        for (int32_t r = 0; r < n_reqs; ++r) {
            if (reqs[r].n_max > 0) sids.push_back(reqs[r].seq_id);
        }
        decode_deferred(s, sids);
    }
    for (int32_t r = 0; r < n_reqs && n_first > n_batch; ++r) {
        const size_t n_def = s->deferred[reqs[r].seq_id].size();
        if (reqs[r].n_max > 0 && n_def > 0) {
            decode_deferred(s, { reqs[r].seq_id });
            n_first -= n_def;
        }
    }
}

// One drafting sequence of the own draft loop (upstream keeps the same per-seq state).
struct draft_lane {
    int32_t            req;    // index into the draft_many requests
    llama_token        tok;    // the token the next row feeds
    std::vector<float> h;      // hidden state fed with it; chained heads: one row per draft-region position (upstream's chain_h)
    std::mt19937       rng;
    bool               active; // false once p_min stopped the draft
    int32_t            idx;    // the lane's output row in the last decode
};

std::vector<draft_lane> make_lanes(const mtp_session * s, const mtp_draft_req * reqs, int32_t n_reqs) {
    std::vector<draft_lane> lanes;
    for (int32_t r = 0; r < n_reqs; ++r) {
        if (reqs[r].n_max == 0) continue;
        lanes.push_back({ r, reqs[r].id_last, s->pending_h[reqs[r].seq_id], std::mt19937(reqs[r].seed), true, -1 });
    }
    return lanes;
}

bool drafts_at(const draft_lane & l, const mtp_draft_req & q, int32_t i) { return l.active && i < q.n_max; }

// Chained heads: head i rebuilds its own layer's KV over the whole draft region: rows
// [id_last, draft...] at pos0.., row t fed the hidden state head t-1 gave (row 0: the
// target's), only the last one an output (upstream's draft()).
void add_chain_rows(mtp_session * s, const mtp_draft_req & q, draft_lane & l, int32_t i) {
    for (int32_t t = 0; t <= i; ++t) {
        const llama_token tok = t == 0 ? q.id_last : q.out[t - 1];
        l.idx = s->dbatch.add(tok, q.pos0 + t, q.seq_id, t == i);
        s->dbatch.set_embd(l.idx, { l.h.data() + (size_t) t * s->n_embd, 1, (size_t) s->n_embd });
    }
}

// One head: draft position i is one row fed the previous row's hidden state; the first
// decode takes the sequence's deferred catch-up rows ahead of it.
void add_single_rows(mtp_session * s, const mtp_draft_req & q, draft_lane & l, int32_t i) {
    if (i == 0) {
        const deferred_rows & d = s->deferred[q.seq_id];
        for (size_t j = 0; j < d.size(); ++j) {
            const int32_t idx = s->dbatch.add(d.tok[j], d.pos[j], q.seq_id, false);
            s->dbatch.set_embd(idx, { d.h.data() + j * s->n_embd, 1, (size_t) s->n_embd });
        }
    }
    l.idx = s->dbatch.add(l.tok, q.pos0 + i, q.seq_id, true);
    s->dbatch.set_embd(l.idx, { l.h.data(), 1, (size_t) s->n_embd });
}

// Decode draft position i of every lane still drafting as one batch on the draft context;
// false when no lane drafts at i. On failure the draft context is trimmed back (the first
// decode's catch-up rows stay deferred; later ones are already in memory).
bool decode_draft_position(mtp_session * s, const mtp_draft_req * reqs, std::vector<draft_lane> & lanes, int32_t i) {
    s->dbatch.clear();
    std::vector<std::pair<int32_t, llama_pos>> rm_from;
    for (draft_lane & l : lanes) {
        const mtp_draft_req & q = reqs[l.req];
        if (!drafts_at(l, q, i)) continue;
        if (chained(s)) {
            rm_from.push_back({ q.seq_id, q.pos0 });
            add_chain_rows(s, q, l, i);
        } else {
            add_single_rows(s, q, l, i);
        }
    }
    if (s->dbatch.size() == 0) return false;
    select_head(s, rm_from, i);
    const int32_t rc = llama_process(s->dft, LLAMA_PROCESS_TYPE_DECODE, s->dbatch.get());
    reset_head(s);
    if (rc != 0) {
        for (const draft_lane & l : lanes) {
            const mtp_draft_req & q = reqs[l.req];
            const deferred_rows & d = s->deferred[q.seq_id];
            const llama_pos from = (i == 0 && d.size()) ? d.pos.front() : q.pos0;
            llama_memory_seq_rm(llama_get_memory(s->dft), q.seq_id, from, -1);
        }
        fail(MTP_ERR_DECODE, "the draft context failed to decode draft position %d of %zu sequence(s)", i, lanes.size());
    }
    return true;
}

// Read draft position i of every lane that drafted it: carry the hidden state over and
// pick the token (a p_min stop ends the lane).
void take_draft_position(mtp_session * s, mtp_draft_req * reqs, std::vector<draft_lane> & lanes, int32_t i) {
    const size_t row_bytes = (size_t) s->n_embd * sizeof(float);
    for (draft_lane & l : lanes) {
        mtp_draft_req & q = reqs[l.req];
        if (!drafts_at(l, q, i)) continue;
        if (i == 0) s->deferred[q.seq_id].clear();
        const float * logits = llama_get_logits_ith(s->dft, l.idx);
        const float * h_next = llama_get_embeddings_nextn_ith(s->dft, l.idx);
        if (logits == nullptr || h_next == nullptr) fail(MTP_ERR_INTERNAL, "the draft context produced no output row");
        if (chained(s)) {
            l.h.insert(l.h.end(), h_next, h_next + s->n_embd);
        } else {
            std::memcpy(l.h.data(), h_next, row_bytes);
        }
        float * q_row = q.q_out ? q.q_out + (size_t) i * s->n_vocab : nullptr;
        const llama_token pick = pick_draft_token(s, logits, q.temp, q.top_k, l.rng, q_row);
        if (pick < 0) {
            l.active = false;
            continue;
        }
        q.out[q.n_out++] = pick;
        l.tok = pick;
    }
}

// The session's own draft loop, mirroring upstream's MTP drafter (hidden-state carry-over:
// each draft row feeds the MTP block the hidden state its previous row produced), for
// several sequences in lockstep: draft position i of every sequence still drafting is one
// decode on the draft context, and the first also takes their deferred catch-up rows.
void draft_own(mtp_session * s, mtp_draft_req * reqs, int32_t n_reqs) {
    check_draft_reqs(s, reqs, n_reqs);
    // every check passed: from here on the calls count and state changes
    for (int32_t r = 0; r < n_reqs; ++r) {
        reqs[r].n_out = 0;
        s->stats.n_draft_calls++;
        sync_deferred(s, reqs[r].seq_id, reqs[r].pos0);
    }
    catch_up_before_drafting(s, reqs, n_reqs);
    std::vector<draft_lane> lanes = make_lanes(s, reqs, n_reqs);
    for (int32_t i = 0; decode_draft_position(s, reqs, lanes, i); ++i) {
        take_draft_position(s, reqs, lanes, i);
    }
    for (int32_t r = 0; r < n_reqs; ++r) {
        mtp_draft_req & q = reqs[r];
        if (q.n_out < s->params.draft.n_min) q.n_out = 0;
        finish_draft(s, q.seq_id, q.pos0, q.n_out, /*own=*/ true);
    }
}

} // namespace

MTP_EXPORT int32_t mtp_session_draft_many(mtp_session * s, mtp_draft_req * reqs, int32_t n_reqs) {
    return guarded([&] {
        check_session(s);
        std::lock_guard<std::mutex> lock(s->mu);
        scoped_timer timer(s->stats.t_draft_us);
        draft_own(s, reqs, n_reqs);
    });
}

MTP_EXPORT int32_t mtp_session_accept(mtp_session * s, int32_t seq_id, int32_t n_accepted) {
    return guarded([&] {
        check_session(s);
        std::lock_guard<std::mutex> lock(s->mu);
        scoped_timer timer(s->stats.t_accept_us);
        check_seq(s, seq_id);
        seq_state & st = s->seqs[seq_id];
        if (!st.pending) {
            fail(MTP_ERR_PROTOCOL, "seq_id %d has no pending draft: accept() settles a non-empty draft()", seq_id);
        }
        if (n_accepted < 0) fail(MTP_ERR_ARG, "n_accepted must be >= 0 (got %d)", n_accepted);
        if (n_accepted > st.last_len) {
            fail(MTP_ERR_PROTOCOL, "n_accepted=%d exceeds the pending draft's %d tokens", n_accepted, st.last_len);
        }
        if (!st.verified) {
            fail(MTP_ERR_PROTOCOL, "seq_id %d: decode [id_last, draft...] on the target and pass that batch to process() before accept()", seq_id);
        }
        if (n_accepted > st.n_verify - 1) {
            fail(MTP_ERR_PROTOCOL, "seq_id %d: the processed verify batch covered only %d draft tokens, cannot accept %d",
                 seq_id, st.n_verify - 1, n_accepted);
        }
        const llama_pos n_past  = st.last_pos0 + 1 + n_accepted;
        const llama_pos tgt_max = pos_max(s->tgt, seq_id);
        const int64_t   n_rm    = (int64_t) tgt_max + 1 - n_past;
        if (n_rm > 0 && s->rollback_bounded && n_rm > (int64_t) llama_n_rs_seq(s->tgt)) {
            fail(MTP_ERR_ROLLBACK, "seq_id %d: the target would have to drop %lld tokens but its recurrent state keeps only %u snapshots (n_rs_seq): create the target with n_rs_seq >= n_draft_max, or restore a checkpoint and re-decode the accepted tokens before accept()",
                 seq_id, (long long) n_rm, llama_n_rs_seq(s->tgt));
        }

        // upstream asserts if its drafter never proposed for this seq; only then can it be told
        if (!st.own_draft || st.upstream_drafted) {
            common_speculative_accept(s->spec, seq_id, (uint16_t) n_accepted);
        }
        {
            const int32_t row = std::min(n_accepted, st.n_verify - 1);
            std::memcpy(s->pending_h[seq_id].data(), s->verify_h[seq_id].data() + (size_t) row * s->n_embd,
                        (size_t) s->n_embd * sizeof(float));
        }

        st.pending  = false;
        st.verified = false;
        s->stats.n_accept_calls++;
        s->stats.n_accepted += n_accepted;
        for (int32_t i = 0; i < n_accepted; ++i) s->accepted_per_pos[i]++;

        if (!llama_memory_seq_rm(llama_get_memory(s->tgt), seq_id, n_past, -1)) {
            fail(MTP_ERR_ROLLBACK, "seq_id %d: the target context refused to remove positions >= %d", seq_id, n_past);
        }
        if (!shares_memory(s)) llama_memory_seq_rm(llama_get_memory(s->dft), seq_id, n_past, -1);
        sync_deferred(s, seq_id, n_past);
    });
}

MTP_EXPORT int32_t mtp_session_forget(mtp_session * s, int32_t seq_id, int32_t keep, int32_t * n_kept) {
    return guarded([&] {
        check_session(s);
        std::lock_guard<std::mutex> lock(s->mu);
        check_seq(s, seq_id);
        if (!s->defer_catchup) fail(MTP_ERR_ARG, "forget needs a session with defer_catchup=1 (it drops deferred catch-up rows)");
        if (keep < 0) fail(MTP_ERR_ARG, "keep must be >= 0 (got %d)", keep);
        if (s->seqs[seq_id].pending) {
            fail(MTP_ERR_PROTOCOL, "seq_id %d has a pending draft: accept() it before forget()", seq_id);
        }
        deferred_rows & d = s->deferred[seq_id];
        if (d.size()) sync_deferred(s, seq_id, d.pos.back() + 1); // drop rows the memory no longer continues
        const bool was_detached = d.detached;
        if (d.size() > (size_t) keep) d.drop_front(d.size() - (size_t) keep, (size_t) s->n_embd);
        llama_memory_seq_rm(llama_get_memory(s->dft), seq_id, -1, -1);
        d.detached = true;
        if (!was_detached) s->stats.n_forget++;
        if (n_kept) *n_kept = (int32_t) d.size();
    });
}

MTP_EXPORT int32_t mtp_probe_mode(llama_context * ctx_tgt, llama_context * ctx_dft, int32_t * mode, int32_t * n_heads) {
    return guarded([&] {
        if (ctx_tgt == nullptr || ctx_dft == nullptr) fail(MTP_ERR_NULL, "a context is NULL");
        if (mode == nullptr || n_heads == nullptr) fail(MTP_ERR_NULL, "out pointer is NULL");
        if (llama_get_model(ctx_dft) == nullptr) fail(MTP_ERR_INIT, "the draft context has no model");
        *mode = draft_mode(ctx_tgt, ctx_dft, n_heads);
    });
}

MTP_EXPORT int32_t mtp_session_get_info(mtp_session * s, mtp_session_info * out) {
    return guarded([&] {
        check_session(s);
        if (out == nullptr) fail(MTP_ERR_NULL, "out pointer is NULL");
        std::lock_guard<std::mutex> lock(s->mu);
        out->mode    = s->mode;
        out->n_heads = s->n_heads;
        out->n_max   = chained(s) ? std::min(s->n_draft_max, s->n_heads) : s->n_draft_max;
    });
}

MTP_EXPORT int32_t mtp_session_has_pending(mtp_session * s, int32_t seq_id, int32_t * out) {
    return guarded([&] {
        check_session(s);
        if (out == nullptr) fail(MTP_ERR_NULL, "out pointer is NULL");
        std::lock_guard<std::mutex> lock(s->mu);
        check_seq(s, seq_id);
        *out = s->seqs[seq_id].pending ? 1 : 0;
    });
}

MTP_EXPORT int32_t mtp_session_drafter_rows(mtp_session * s, int32_t seq_id, int32_t upto, int32_t * out) {
    return guarded([&] {
        check_session(s);
        if (out == nullptr) fail(MTP_ERR_NULL, "out pointer is NULL");
        if (upto < 0) fail(MTP_ERR_ARG, "upto must be >= 0 (got %d)", upto);
        std::lock_guard<std::mutex> lock(s->mu);
        check_seq(s, seq_id);
        if (shares_memory(s)) {
            *out = upto;
        } else if (upto <= llama_memory_seq_pos_min(llama_get_memory(s->dft), seq_id)) {
            // a memory that restarted past 0 (after mtp_session_forget), trimmed below its first
            // row, would leave deferred rows continuing nothing: only a full restart is safe. Trimmed
            // past its first row it goes on from there (it lacks the rows before the restart)
            *out = 0;
        } else {
            *out = std::min<llama_pos>(drafter_pos_max(s, seq_id, upto) + 1, upto);
        }
    });
}

MTP_EXPORT int32_t mtp_session_catch_up(mtp_session * s, int32_t seq_id) {
    return guarded([&] {
        check_session(s);
        std::lock_guard<std::mutex> lock(s->mu);
        check_seq(s, seq_id);
        if (!s->defer_catchup) return;
        sync_deferred(s, seq_id, pos_max(s->tgt, seq_id) + 1);
        decode_deferred(s, { seq_id });
    });
}

MTP_EXPORT int32_t mtp_session_stats(mtp_session * s, mtp_stats * out,
                                     int64_t * drafted_per_pos, int64_t * accepted_per_pos, int32_t n_pos) {
    return guarded([&] {
        check_session(s);
        if (out == nullptr) fail(MTP_ERR_NULL, "out pointer is NULL");
        if (n_pos < 0) fail(MTP_ERR_ARG, "n_pos must be >= 0 (got %d)", n_pos);
        std::lock_guard<std::mutex> lock(s->mu);
        *out = s->stats;
        for (int32_t i = 0; i < n_pos; ++i) {
            const bool in_range = i < (int32_t) s->drafted_per_pos.size();
            if (drafted_per_pos)  drafted_per_pos[i]  = in_range ? s->drafted_per_pos[i]  : 0;
            if (accepted_per_pos) accepted_per_pos[i] = in_range ? s->accepted_per_pos[i] : 0;
        }
    });
}
