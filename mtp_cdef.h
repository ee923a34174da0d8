/*
 * llama-mtp shim: the C surface, and the only thing cffi sees.
 *
 * Parsed by cffi (out-of-line ABI mode, see build_ffi.py) and included by
 * shim/mtp_shim.cpp. Keep it plain C with no preprocessor logic: only opaque
 * handles, scalars, pointers and integer #defines.
 *
 * Every function returns an mtp_status; on failure mtp_last_error() holds a
 * message for the calling thread. No function aborts on bad input.
 */

#define MTP_ABI_VERSION 11

struct llama_context;
struct llama_batch;

/* Upstream's three MTP draft modes (common_speculative_impl_draft_mtp), derived as upstream
 * does: MEM_SHARED when the draft context's ctx_other is the target (gemma4 assistant: shares
 * the target's KV, all heads in one graph), else CHAIN_HEADS when the draft model has more
 * than one nextn layer (step35: head i drafts position i, selected with the nextn layer
 * offset), else SINGLE (one trained head drafts every position). */
#define MTP_MODE_SINGLE      0
#define MTP_MODE_CHAIN_HEADS 1
#define MTP_MODE_MEM_SHARED  2
typedef struct mtp_session mtp_session;

enum mtp_status {
    MTP_OK            = 0,
    MTP_ERR_NULL      = 1,  /* a required pointer was NULL                              */
    MTP_ERR_ARG       = 2,  /* an argument is out of range or inconsistent              */
    MTP_ERR_SEQ       = 3,  /* seq id outside [0, n_seq)                                */
    MTP_ERR_PROTOCOL  = 4,  /* call out of order (draft while pending, accept w/o draft) */
    MTP_ERR_INIT      = 5,  /* contexts unsuitable for an MTP session                   */
    MTP_ERR_PROCESS   = 6,  /* batch cannot be handed to the drafter                    */
    MTP_ERR_DECODE    = 7,  /* llama.cpp failed to decode on the draft context          */
    MTP_ERR_ROLLBACK  = 8,  /* target cannot remove that many tokens (n_rs_seq too low) */
    MTP_ERR_INTERNAL  = 9   /* C++ exception or unexpected upstream failure             */
};

typedef struct mtp_config {
    int32_t n_seq;            /* sequences the session drafts for: seq ids 0..n_seq-1   */
    int32_t n_draft_max;      /* longest draft                                          */
    int32_t n_min;            /* drafts shorter than this are dropped (upstream n_min)   */
    float   p_min;            /* stop drafting below this top-1 probability              */
    int32_t backend_sampling; /* upstream's draft sampling on the backend (1) or CPU (0) */
    int32_t defer_catchup;    /* 1: process() only records (token, pos, hidden state); the
                                 next draft_many decodes them on the draft context in the
                                 same batch as its first draft token, so plain steps (no draft)
                                 cost no draft decode. Needs backend_sampling = 0; upstream's
                                 drafter (mtp_session_draft) is then unavailable, and
                                 MTP_MODE_MEM_SHARED pairs are refused (the own loop
                                 does not implement that mode).                         */
    int32_t ctx_type_tgt;     /* the contexts' llama_context_type, as they were created: the
                                 type is not readable through llama.h, and the caller built
                                 the param structs (must be DEFAULT and MTP)             */
    int32_t ctx_type_dft;
} mtp_config;

/* One sequence's request to mtp_session_draft_many (the own draft loop). */
typedef struct mtp_draft_req {
    int32_t   seq_id;
    int32_t   pos0;           /* n_past of the sequence                                  */
    int32_t   id_last;        /* last committed token (not yet in the context)           */
    int32_t   n_max;          /* tokens to draft, 0..n_draft_max                         */
    float     temp;           /* 0: argmax; > 0: sample from q = softmax(top_k / temp)    */
    int32_t   top_k;          /* >= 1                                                    */
    uint32_t  seed;
    float *   q_out;          /* NULL or n_max x n_vocab floats: q per drafted position  */
    int32_t * out;            /* capacity n_draft_max                                    */
    int32_t   n_out;          /* out: tokens drafted                                     */
} mtp_draft_req;

typedef struct mtp_stats {
    int64_t n_draft_calls;    /* draft() calls                                          */
    int64_t n_drafts;         /* draft() calls that returned >= 1 token                 */
    int64_t n_drafted;        /* tokens proposed                                        */
    int64_t n_accept_calls;   /* accept() calls                                         */
    int64_t n_accepted;       /* tokens accepted                                        */
    int64_t n_process_calls;  /* process() calls                                        */
    int64_t n_process_tokens; /* tokens handed to process()                             */
    int64_t t_draft_us;       /* time inside draft()                                    */
    int64_t t_process_us;     /* time inside process()                                  */
    int64_t t_accept_us;      /* time inside accept()                                   */
    int64_t n_forget;         /* forget() calls that emptied a sequence's draft memory   */
} mtp_stats;

typedef struct mtp_session_info {
    int32_t mode;             /* MTP_MODE_*                                              */
    int32_t n_heads;          /* nextn layers of the draft model (>= 1)                   */
    int32_t n_max;            /* longest draft either loop proposes: n_draft_max, capped
                                 at n_heads in CHAIN_HEADS mode (as upstream caps it)    */
} mtp_session_info;

int32_t      mtp_abi_version(void);
const char * mtp_last_error(void);
const char * mtp_build_info(void);

/* Create a session on a target context (type DEFAULT) and an MTP draft context
 * (type MTP) on the same model. Create it before the prompt is decoded: from
 * now on the target outputs the hidden states the drafter needs. */
int32_t mtp_session_new(struct llama_context * ctx_tgt, struct llama_context * ctx_dft,
                        const mtp_config * cfg, mtp_session ** out);

/* Free the session. Must happen before either context is freed. NULL is a no-op. */
int32_t mtp_session_free(mtp_session * s);

/* Start a new generation on seq_id (drops any pending proposal for it). */
int32_t mtp_session_begin(mtp_session * s, int32_t seq_id, const int32_t * tokens, int32_t n_tokens);

/* Hand the batch that was just decoded on the target to the drafter. */
int32_t mtp_session_process(mtp_session * s, const struct llama_batch * batch);

/* Propose up to n_max tokens (n_max < 0: the session's n_draft_max) continuing
 * id_last at position pos0. *inout_n: capacity of out in, tokens written out. */
int32_t mtp_session_draft(mtp_session * s, int32_t seq_id, int32_t pos0, int32_t id_last,
                          int32_t n_max, int32_t * out, int32_t * inout_n);

/* The session's own draft loop on the MTP context (same inputs as upstream's),
 * for one or several sequences (distinct seq ids): draft position i of every
 * sequence still drafting is ONE decode on the MTP context (the first one also
 * takes each sequence's deferred catch-up rows). Each request stops after its
 * n_max tokens, and with temp > 0 samples each token from
 * q = softmax(top_k MTP logits / temp) with a PRNG seeded by seed; temp == 0
 * takes the argmax. q_out (NULL or n_max x n_vocab floats) receives q per
 * drafted position. Needs a session created with backend_sampling = 0. All
 * checks run before anything changes; on failure no request has a pending draft. */
int32_t mtp_session_draft_many(mtp_session * s, mtp_draft_req * reqs, int32_t n_reqs);

/* Settle the pending proposal: n_accepted in [0, last draft length]. Trims the
 * target and draft contexts of seq_id to pos0 + 1 + n_accepted. */
int32_t mtp_session_accept(mtp_session * s, int32_t seq_id, int32_t n_accepted);

/* defer_catchup sessions: drop seq_id's draft-context history, keeping only its
 * last `keep` deferred catch-up rows (*n_kept, may be NULL: how many there are).
 * The draft memory of seq_id is emptied; the next draft decodes the kept rows
 * and goes on from there. For long plain-decoding runs, which would otherwise
 * decode one MTP row per token for drafts that may never come. Drafting stays
 * exact (verification does not change); the MTP head just sees a shorter past.
 * Fails with MTP_ERR_PROTOCOL while a draft of seq_id awaits accept(). */
int32_t mtp_session_forget(mtp_session * s, int32_t seq_id, int32_t keep, int32_t * n_kept);

/* The draft mode of a (target, draft) pair, as a session on them would derive it,
 * without creating one: lets a caller pick a drafter first. */
int32_t mtp_probe_mode(struct llama_context * ctx_tgt, struct llama_context * ctx_dft,
                       int32_t * mode, int32_t * n_heads);

int32_t mtp_session_get_info(mtp_session * s, mtp_session_info * out);

int32_t mtp_session_has_pending(mtp_session * s, int32_t seq_id, int32_t * out);

/* How many leading positions of seq_id the drafter can continue from: a target batch for
 * seq_id may start at any position <= *out (after trimming both contexts there), given the
 * target holds positions < upto. Counts the rows in the draft context and the deferred
 * catch-up rows the session keeps; a drafter on the target's KV continues from anywhere (upto).
 * 0 when the draft memory restarted past position 0 (after mtp_session_forget). */
int32_t mtp_session_drafter_rows(mtp_session * s, int32_t seq_id, int32_t upto, int32_t * out);

/* Decode seq_id's deferred catch-up rows on the draft context now (defer_catchup), so the draft
 * context's own memory holds every row the drafter has seen (before its state is saved). */
int32_t mtp_session_catch_up(mtp_session * s, int32_t seq_id);

/* Counters; drafted_per_pos[i] / accepted_per_pos[i]: drafts with more than i
 * tokens / accept calls with more than i accepted, for i < n_pos (may be NULL). */
int32_t mtp_session_stats(mtp_session * s, mtp_stats * out,
                          int64_t * drafted_per_pos, int64_t * accepted_per_pos, int32_t n_pos);

/* ---- chat: upstream common/chat.cpp, as llama-server uses it (shim/mtp_chat.cpp) ----------
 * JSON in, JSON out; every char ** result is malloc'ed and released with mtp_string_free.
 * Errors in a request (a bad message list, tools, tool_choice, a template's raise_exception)
 * return MTP_ERR_ARG with the message upstream gives. */
struct llama_model;
struct llama_vocab;
typedef struct mtp_chat_templates mtp_chat_templates;
typedef struct mtp_chat_stream mtp_chat_stream;

/* The model's chat templates as llama-server loads them: the GGUF's tokenizer.chat_template
 * (and its tool_use variant), or override_template when not NULL/empty. */
int32_t mtp_chat_templates_init(const struct llama_model * model, const char * override_template,
                                mtp_chat_templates ** out);
void    mtp_chat_templates_free(mtp_chat_templates * t);
/* {"source", "tool_use_source", "explicit", "supports_thinking", "caps": {name: bool}} */
int32_t mtp_chat_templates_info(mtp_chat_templates * t, char ** out_json);
/* An OpenAI chat body -> {"prompt", "format", "format_id", "grammar", "grammar_lazy", "grammar_type",
 * "grammar_triggers": [{"type", "value", "token"}], "preserved_tokens", "additional_stops",
 * "generation_prompt", "supports_thinking", "thinking_start_tag", "thinking_end_tags", "parser",
 * "parse_tool_calls", "reasoning_format", "is_continuation", "enable_thinking",
 * "message_delimiters": [{"role", "delimiter"}] (autoparsed templates; else empty)}.
 * options_json (may be NULL): server defaults {"reasoning_format", "enable_thinking",
 * "prefill_assistant", "chat_template_kwargs": {name: JSON text}}. */
int32_t mtp_chat_apply(mtp_chat_templates * t, const char * body_json, const char * options_json, char ** out_json);
/* A parser over one reply: params_json = mtp_chat_apply's result plus "stream" (bool). */
int32_t mtp_chat_stream_new(const char * params_json, mtp_chat_stream ** out);
void    mtp_chat_stream_free(mtp_chat_stream * s);
/* Add n_text bytes of generated text (is_partial = 0 on the last call) -> {"message": OpenAI
 * message so far, "diffs": [OpenAI deltas since the last call], "n_tool_calls", "parse_error":
 * null or why a final text that broke its format came back as plain content}. */
int32_t mtp_chat_stream_update(mtp_chat_stream * s, const char * text, size_t n_text, int32_t is_partial,
                               char ** out_json);
void    mtp_string_free(char * s);
/* Where each message of a tokenized prompt starts, as llama-server finds them to checkpoint at
 * (common_chat_msg_delimiters::tokenize on vocab, then ::split): delimiters_json is mtp_chat_apply's
 * "message_delimiters" array -> [{"role", "pos", "len"}] in prompt order. */
int32_t mtp_chat_message_spans(const struct llama_vocab * vocab, const char * delimiters_json,
                               const int32_t * tokens, int32_t n_tokens, char ** out_json);

/* llama-server's grammar sampler for a chat template's grammar (common_sampler_init): lazy
 * (waiting for one of the trigger regex patterns or tokens) or eager, with the generation
 * prompt's tokens accepted first (prefill). The caller owns *out (llama_sampler_free, or a
 * sampler chain it is added to). A grammar that does not parse, or a prefill it refuses,
 * returns MTP_ERR_ARG and no sampler. */
struct llama_sampler;
int32_t mtp_grammar_sampler_new(const struct llama_vocab * vocab, const char * grammar, int32_t lazy,
                                const char ** patterns, int32_t n_patterns, const int32_t * tokens, int32_t n_tokens,
                                const int32_t * prefill, int32_t n_prefill, struct llama_sampler ** out);

/* llama_sampler_sample on row idx of ctx's last decode, with the chain's accept of the chosen token
 * guarded: a grammar that refuses it (a lazy grammar triggered inside a token whose remaining text
 * breaks its rules) throws upstream, which would terminate the process. Then *refused = 1, *token
 * still holds the token, mtp_last_error() says why, and the sampler must not be used again. */
int32_t mtp_sampler_sample(struct llama_sampler * smpl, struct llama_context * ctx, int32_t idx, int32_t * token,
                           int32_t * refused);
