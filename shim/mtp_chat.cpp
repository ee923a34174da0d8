// llama-mtp shim: chat templates and chat output parsing, as llama-server does them.
//
// Upstream's common/chat.cpp (jinja engine, per-family tool-call and reasoning formats,
// automatic format detection, PEG parsers) behind a JSON-in / JSON-out C surface:
//   mtp_chat_templates_*  the model's templates (common_chat_templates_init)
//   mtp_chat_apply        an OpenAI chat request -> prompt, grammar, triggers, parser
//                         (the chat half of llama-server's oaicompat_chat_params_parse)
//   mtp_chat_stream_*     generated text -> the OpenAI message and its streaming deltas
//                         (llama-server's task_result_state::update_chat_msg)
// Mirrors tools/server/server-common.cpp and server-task.cpp of the same llama.cpp;
// keep the two in step on every sync (tests/test_chat_templates.py compares renders with
// llama-server's /apply-template).

#include "chat.h"
#include "common.h"
#include "json.h"
#include "log.h"
#include "mtp_guard.h"

#include <cstdlib>
#include <cstring>
#include <map>
#include <algorithm>
#include <random>
#include <regex>
#include <string>
#include <unordered_set>
#include <vector>

using json = common_json;  // as tools/server does

struct mtp_chat_templates {
    common_chat_templates_ptr tmpls;
    bool supports_thinking = false;
};

struct mtp_chat_stream {
    common_chat_parser_params params;
    std::vector<std::string> call_words;   // the template's tool-call trigger words (grammar_triggers)
    std::vector<std::string> call_patterns;  // and regex triggers
    common_chat_msg msg;                 // the message parsed so far
    std::string generated;               // every text piece added so far
    std::vector<std::string> tool_call_ids;
    std::string parse_error;             // why the final parse fell back to plain content
};

namespace {

// llama-server's json_value: a missing or null field, or one of the wrong type, takes the default
template <typename T>
T value_or(const json & body, const char * key, const T & fallback) {
    if (!body.is_object() || !body.contains(key) || body.at(key).is_null()) {
        return fallback;
    }
    try {
        return body.at(key).get<T>();
    } catch (const common_json_error &) {
        return fallback;
    }
}

// llama-server's random_string(): tool call ids
std::string random_id() {
    static const char alphabet[] = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    std::random_device rd;
    std::mt19937 gen(rd());
    std::string out(32, ' ');
    for (char & c : out) {
        c = alphabet[gen() % (sizeof(alphabet) - 1)];
    }
    return out;
}

char * to_c_string(const std::string & s) {
    char * out = static_cast<char *>(std::malloc(s.size() + 1));
    if (!out) {
        throw std::bad_alloc();
    }
    std::memcpy(out, s.data(), s.size());
    out[s.size()] = '\0';
    return out;
}

json parse_json_arg(const char * text, const char * what) {
    if (!text) {
        fail(MTP_ERR_NULL, "%s is NULL", what);
    }
    json out = json::parse_no_throw(text);
    if (out.is_discarded() || !out.is_object()) {
        fail(MTP_ERR_ARG, "%s is not a JSON object", what);
    }
    return out;
}

const char * trigger_type_name(common_grammar_trigger_type type) {
    switch (type) {
        case COMMON_GRAMMAR_TRIGGER_TYPE_TOKEN:        return "token";
        case COMMON_GRAMMAR_TRIGGER_TYPE_WORD:         return "word";
        case COMMON_GRAMMAR_TRIGGER_TYPE_PATTERN:      return "pattern";
        case COMMON_GRAMMAR_TRIGGER_TYPE_PATTERN_FULL: return "pattern_full";
    }
    return "unknown";
}

// The chat half of oaicompat_chat_params_parse (tools/server/server-common.cpp): the
// messages, tools and template options of an OpenAI body -> common_chat_templates_apply.
// `opt` holds the server-wide defaults (llama-server's server_chat_params).
json apply(const mtp_chat_templates & t, const json & body, const json & opt) {
    json out;
    json tools = value_or<json>(body, "tools", json());
    std::string tool_choice = "auto";
    if (body.contains("tool_choice") && !body.at("tool_choice").is_null()) {
        const json & choice = body.at("tool_choice");
        if (choice.is_string()) {
            tool_choice = choice.get<std::string>();
        } else {
            // OpenAI's named tool: {"type": "function", "function": {"name": ...}}. llama-server
            // reads only the string forms; here the named tool is the only one offered, and required
            const std::string name = choice.is_object() && choice.contains("function") && choice.at("function").is_object()
                ? value_or<std::string>(choice.at("function"), "name", "") : "";
            if (name.empty()) {
                throw std::invalid_argument("tool_choice must be \"auto\", \"none\", \"required\" or "
                                            "{\"type\": \"function\", \"function\": {\"name\": ...}}");
            }
            json named = json::array();
            for (const auto & tool : tools.is_array() ? tools : json::array()) {
                if (tool.is_object() && tool.contains("function") && tool.at("function").is_object()
                    && value_or<std::string>(tool.at("function"), "name", "") == name) {
                    named.push_back(tool);
                }
            }
            if (named.empty()) {
                throw std::invalid_argument("tool_choice names a function that is not in tools: " + name);
            }
            tools = named;
            tool_choice = "required";
        }
    }

    json json_schema = value_or<json>(body, "json_schema", json());
    const std::string grammar = value_or<std::string>(body, "grammar", "");
    if (!json_schema.is_null() && !grammar.empty()) {
        throw std::invalid_argument("Cannot use both json_schema and grammar");
    }
    if (body.contains("response_format")) {
        const json response_format = value_or<json>(body, "response_format", json::object());
        const std::string type = value_or<std::string>(response_format, "type", "");
        if (type == "json_object") {
            if (response_format.contains("schema") || json_schema.empty()) {
                json_schema = value_or<json>(response_format, "schema", json::object());
            }
        } else if (type == "json_schema") {
            const json wrapper = value_or<json>(response_format, "json_schema", json::object());
            json_schema = value_or<json>(wrapper, "schema", json::object());
        } else if (!type.empty() && type != "text") {
            throw std::invalid_argument("response_format type must be one of \"text\" or \"json_object\", but got: " + type);
        }
    }
    if (json_schema.is_object() && json_schema.empty()) {
        json_schema["type"] = "object";  // an absent or empty schema means any object
    }

    if (!body.contains("messages")) {
        throw std::invalid_argument("'messages' is required");
    }
    const json & messages = body.at("messages");
    if (!messages.is_array()) {
        throw std::invalid_argument("Expected 'messages' to be an array");
    }
    for (const auto & msg : messages) {
        const std::string role = value_or<std::string>(msg, "role", "");
        if (role != "assistant" && !msg.contains("content")) {
            throw std::invalid_argument("All non-assistant messages must contain 'content'");
        }
        if (role == "assistant" && !msg.contains("content") && !msg.contains("tool_calls")) {
            throw std::invalid_argument("Assistant message must contain either 'content' or 'tool_calls'!");
        }
    }

    auto caps = common_chat_templates_get_caps(t.tmpls.get());
    common_chat_templates_inputs inputs;
    inputs.messages               = common_chat_msgs_parse_oaicompat(messages);
    inputs.tools                  = common_chat_tools_parse_oaicompat(tools);
    inputs.tool_choice            = common_chat_tool_choice_parse_oaicompat(tool_choice);
    inputs.json_schema            = json_schema.is_null() ? "" : json_schema.dump();
    inputs.grammar                = grammar;
    inputs.use_jinja              = true;
    inputs.parallel_tool_calls    = value_or<bool>(body, "parallel_tool_calls", caps["supports_parallel_tool_calls"]);
    inputs.add_generation_prompt  = value_or<bool>(body, "add_generation_prompt", true);
    inputs.continue_final_message = body.contains("continue_final_message")
        ? common_chat_continuation_parse(body.at("continue_final_message")) : COMMON_CHAT_CONTINUATION_NONE;
    if (inputs.continue_final_message == COMMON_CHAT_CONTINUATION_NONE && value_or<bool>(opt, "prefill_assistant", true)
        && !inputs.messages.empty() && inputs.messages.back().role == "assistant") {
        if (inputs.messages.size() >= 2 && inputs.messages[inputs.messages.size() - 2].role == "assistant") {
            throw std::invalid_argument("Cannot have 2 or more assistant messages at the end of the list.");
        }
        inputs.continue_final_message = COMMON_CHAT_CONTINUATION_AUTO;
        inputs.add_generation_prompt  = false;
    }
    if (inputs.continue_final_message != COMMON_CHAT_CONTINUATION_NONE && inputs.add_generation_prompt) {
        throw std::invalid_argument("Cannot set both add_generation_prompt and continue_final_message to true.");
    }
    if (inputs.continue_final_message != COMMON_CHAT_CONTINUATION_NONE && !inputs.messages.empty()
        && inputs.messages.back().role == "assistant" && !inputs.messages.back().tool_calls.empty()) {
        throw std::invalid_argument("Cannot continue an assistant message that contains tool calls.");
    }
    inputs.reasoning_format = common_reasoning_format_from_name(
        value_or<std::string>(body, "reasoning_format", value_or<std::string>(opt, "reasoning_format", "deepseek")));
    inputs.enable_thinking = value_or<bool>(opt, "enable_thinking", true) && t.supports_thinking;
    bool parse_tool_calls = false;
    if (!inputs.tools.empty() && inputs.tool_choice != COMMON_CHAT_TOOL_CHOICE_NONE) {
        if (body.contains("grammar")) {
            throw std::invalid_argument("Cannot use custom grammar constraints with tools.");
        }
        parse_tool_calls = true;
    }

    // server defaults, then the request's own kwargs (each value kept as its JSON text)
    // (named locals: items() views its json, which a temporary would not outlive)
    const json default_kwargs = value_or<json>(opt, "chat_template_kwargs", json::object());
    for (const auto & item : default_kwargs.items()) {
        inputs.chat_template_kwargs[item.key()] = item.value().get<std::string>();
    }
    const json request_kwargs = value_or<json>(body, "chat_template_kwargs", json::object());
    if (!request_kwargs.is_object()) {
        throw std::invalid_argument("chat_template_kwargs must be an object");
    }
    for (const auto & item : request_kwargs.items()) {
        inputs.chat_template_kwargs[item.key()] = item.value().dump();
    }
    const auto thinking_kwarg = inputs.chat_template_kwargs.find("enable_thinking");
    if (thinking_kwarg != inputs.chat_template_kwargs.end()) {
        if (thinking_kwarg->second == "true") {
            inputs.enable_thinking = true;
        } else if (thinking_kwarg->second == "false") {
            inputs.enable_thinking = false;
        } else if (!thinking_kwarg->second.empty() && thinking_kwarg->second[0] == '"') {
            throw std::invalid_argument("invalid type for \"enable_thinking\" (expected boolean, got string)");
        }
    }
    if (body.contains("reasoning_effort")) {
        const std::string effort = value_or<std::string>(body, "reasoning_effort", "");
        if (effort == "none") {
            inputs.enable_thinking = false;
            inputs.chat_template_kwargs.erase("reasoning_effort");
        } else if (!effort.empty()) {
            inputs.chat_template_kwargs["reasoning_effort"] = json(effort).dump();
        }
    }

    const common_chat_params params = common_chat_templates_apply(t.tmpls.get(), inputs);

    json triggers = json::array();
    for (const auto & trigger : params.grammar_triggers) {
        triggers.push_back({{"type", trigger_type_name(trigger.type)}, {"value", trigger.value}, {"token", trigger.token}});
    }
    out["prompt"]             = params.prompt;
    out["format"]             = common_chat_format_name(params.format);
    out["format_id"]          = static_cast<int>(params.format);
    out["grammar"]            = params.grammar;
    out["grammar_lazy"]       = params.grammar_lazy;
    // llama-server marks a template's grammar as "tool_calls" (prefilled with the generation
    // prompt unless lazy); a request's own grammar stays "user" (never prefilled)
    out["grammar_type"]       = params.grammar.empty() ? "none" : (grammar == params.grammar ? "user" : "tool_calls");
    out["grammar_triggers"]   = triggers;
    out["preserved_tokens"]   = params.preserved_tokens;
    out["additional_stops"]   = params.additional_stops;
    out["generation_prompt"]  = params.generation_prompt;
    out["supports_thinking"]  = params.supports_thinking;
    out["thinking_start_tag"] = params.thinking_start_tag;
    out["thinking_end_tags"]  = params.thinking_end_tags;
    out["parser"]             = params.parser;
    out["parse_tool_calls"]   = parse_tool_calls;
    out["reasoning_format"]   = common_reasoning_format_name(inputs.reasoning_format);
    out["is_continuation"]    = inputs.continue_final_message != COMMON_CHAT_CONTINUATION_NONE;
    out["enable_thinking"]    = inputs.enable_thinking;
    // where each message starts ({role, delimiter} text; autoparsed templates only): llama-server
    // checkpoints a recurrent target's prompt at user-message starts (server-context.cpp)
    out["message_delimiters"] = params.message_delimiters.to_json();
    return out;
}

// server_chat_msg_diff_to_json_oaicompat (tools/server/server-chat.cpp)
json diff_to_json(const common_chat_msg_diff & diff) {
    json delta = json::object();
    if (!diff.reasoning_content_delta.empty()) {
        delta["reasoning_content"] = diff.reasoning_content_delta;
    }
    if (!diff.content_delta.empty()) {
        delta["content"] = diff.content_delta;
    }
    if (diff.tool_call_index != std::string::npos) {
        json tool_call;
        tool_call["index"] = diff.tool_call_index;
        if (!diff.tool_call_delta.id.empty()) {
            tool_call["id"]   = diff.tool_call_delta.id;
            tool_call["type"] = "function";
        }
        if (!diff.tool_call_delta.name.empty() || !diff.tool_call_delta.arguments.empty()) {
            json function = json::object();
            if (!diff.tool_call_delta.name.empty()) {
                function["name"] = diff.tool_call_delta.name;
            }
            if (!diff.tool_call_delta.arguments.empty()) {
                function["arguments"] = diff.tool_call_delta.arguments;
            }
            tool_call["function"] = function;
        }
        delta["tool_calls"] = json::array({ tool_call });
    }
    return delta;
}

// task_result_state::update_chat_msg (tools/server/server-task.cpp), without the tool-call
// filter (the OpenAI chat route does not use it). A final parse that fails (the model broke
// its own format) keeps the whole text as content instead of failing the request.
json update(mtp_chat_stream & s, const std::string & added, bool is_partial) {
    s.generated += added;
    const common_chat_msg previous = s.msg;
    common_chat_msg parsed;
    try {
        parsed = common_chat_parse(s.generated, is_partial, s.params);
    } catch (const std::exception & e) {
        if (is_partial) {
            parsed = previous;  // wait for more text
        } else {
            s.parse_error = e.what();
            parsed = common_chat_msg();
            parsed.role = "assistant";
            parsed.content = s.generated;
        }
    }
    if (!is_partial && s.params.parse_tool_calls && parsed.tool_calls.empty() && s.parse_error.empty()) {
        // upstream's lenient parser drops a tool call that breaks its format without a word; the
        // text from where the call starts comes back as content instead, and the caller logs it
        size_t start = std::string::npos;
        for (const auto & word : s.call_words) {
            start = std::min(start, s.generated.find(word));
        }
        for (const auto & pattern : s.call_patterns) {
            std::smatch m;
            if (std::regex_search(s.generated, m, std::regex(pattern))) {
                start = std::min(start, (size_t) m.position(0));
            }
        }
        if (start != std::string::npos && parsed.content.find(s.generated.substr(start)) == std::string::npos) {
            s.parse_error = std::string("a tool call does not follow the ") + common_chat_format_name(s.params.format)
                + " format";
            parsed.role = "assistant";
            parsed.content += s.generated.substr(start);
        }
    }
    json diffs = json::array();
    if (!parsed.empty()) {
        parsed.set_tool_call_ids(s.tool_call_ids, random_id);
        s.msg = parsed;
        for (const auto & diff : common_chat_msg_diff::compute_diffs(previous, s.msg)) {
            diffs.push_back(diff_to_json(diff));
        }
    }
    json out;
    out["message"] = s.msg.empty() ? json{{"role", "assistant"}, {"content", nullptr}} : s.msg.to_json_oaicompat();
    out["diffs"] = diffs;
    out["n_tool_calls"] = s.msg.tool_calls.size();
    out["parse_error"] = s.parse_error.empty() ? json() : json(s.parse_error);
    return out;
}

} // namespace

MTP_EXPORT int32_t mtp_chat_templates_init(const struct llama_model * model, const char * override_template,
                                           mtp_chat_templates ** out) {
    return guarded([&] {
        if (!model || !out) {
            fail(MTP_ERR_NULL, "mtp_chat_templates_init: model and out must not be NULL");
        }
        *out = nullptr;
        auto t = std::make_unique<mtp_chat_templates>();
        t->tmpls = common_chat_templates_init(model, override_template ? override_template : "");
        if (!t->tmpls) {
            fail(MTP_ERR_ARG, "the model's chat template could not be loaded");
        }
        t->supports_thinking = common_chat_templates_support_enable_thinking(t->tmpls.get());
        *out = t.release();
    }, MTP_ERR_ARG);
}

MTP_EXPORT void mtp_chat_templates_free(mtp_chat_templates * t) {
    delete t;
}

MTP_EXPORT int32_t mtp_chat_templates_info(mtp_chat_templates * t, char ** out_json) {
    return guarded([&] {
        if (!t || !out_json) {
            fail(MTP_ERR_NULL, "mtp_chat_templates_info: NULL argument");
        }
        json caps = json::object();
        for (const auto & [name, value] : common_chat_templates_get_caps(t->tmpls.get())) {
            caps[name] = value;
        }
        json info = {
            {"source", common_chat_templates_source(t->tmpls.get())},
            {"tool_use_source", common_chat_templates_source(t->tmpls.get(), "tool_use")},
            {"explicit", common_chat_templates_was_explicit(t->tmpls.get())},
            {"supports_thinking", t->supports_thinking},
            {"caps", caps},
        };
        *out_json = to_c_string(info.dump());
    });
}

MTP_EXPORT int32_t mtp_chat_message_spans(const llama_vocab * vocab, const char * delimiters_json,
                                          const int32_t * tokens, int32_t n_tokens, char ** out_json) {
    return guarded([&] {
        if (!vocab || !delimiters_json || !out_json || (n_tokens > 0 && !tokens) || n_tokens < 0) {
            fail(MTP_ERR_NULL, "mtp_chat_message_spans: NULL argument or negative length");
        }
        *out_json = nullptr;
        const json delims_json = json::parse_no_throw(delimiters_json);
        if (delims_json.is_discarded() || !delims_json.is_array()) {
            fail(MTP_ERR_ARG, "the message delimiters are not a JSON array");
        }
        // server-context.cpp (task params): parse, tokenize on the model's vocabulary, split
        common_chat_msg_delimiters delims = common_chat_msg_delimiters_parse(delims_json);
        delims.tokenize(vocab);
        const common_chat_msg_spans spans = delims.split(llama_tokens(tokens, tokens + n_tokens));
        json out = json::array();
        for (const auto & span : spans.spans) {
            out.push_back({{"role", common_chat_role_to_string(span.role)}, {"pos", span.pos}, {"len", span.len}});
        }
        *out_json = to_c_string(out.dump());
    });
}

MTP_EXPORT int32_t mtp_chat_apply(mtp_chat_templates * t, const char * body_json, const char * options_json,
                                  char ** out_json) {
    return guarded([&] {
        if (!t || !out_json) {
            fail(MTP_ERR_NULL, "mtp_chat_apply: NULL argument");
        }
        *out_json = nullptr;
        const json body = parse_json_arg(body_json, "the request body");
        const json opt = options_json ? parse_json_arg(options_json, "the options") : json::object();
        *out_json = to_c_string(apply(*t, body, opt).dump());
    }, MTP_ERR_ARG);
}

MTP_EXPORT int32_t mtp_chat_stream_new(const char * params_json, mtp_chat_stream ** out) {
    return guarded([&] {
        if (!out) {
            fail(MTP_ERR_NULL, "mtp_chat_stream_new: out is NULL");
        }
        *out = nullptr;
        const json p = parse_json_arg(params_json, "the parser parameters");
        auto s = std::make_unique<mtp_chat_stream>();
        s->params.format = static_cast<common_chat_format>(value_or<int>(p, "format_id", 0));
        if (s->params.format < 0 || s->params.format >= COMMON_CHAT_FORMAT_COUNT) {
            fail(MTP_ERR_ARG, "unknown chat format id %d", (int) s->params.format);
        }
        const auto reasoning = common_reasoning_format_from_name(value_or<std::string>(p, "reasoning_format", "none"));
        s->params.reasoning_format = reasoning;
        // as llama-server's params_from_json_cmpl: deepseek-legacy keeps <think> inline when streaming
        s->params.reasoning_in_content = value_or<bool>(p, "stream", false) && reasoning == COMMON_REASONING_FORMAT_DEEPSEEK_LEGACY;
        s->params.generation_prompt = value_or<std::string>(p, "generation_prompt", "");
        s->params.parse_tool_calls = value_or<bool>(p, "parse_tool_calls", false);
        s->params.is_continuation = value_or<bool>(p, "is_continuation", false);
        const std::string parser = value_or<std::string>(p, "parser", "");
        if (!parser.empty()) {
            s->params.parser.load(parser);
        }
        const json triggers = value_or<json>(p, "grammar_triggers", json::array());
        for (size_t i = 0; triggers.is_array() && i < triggers.size(); ++i) {
            const std::string type = value_or<std::string>(triggers.at(i), "type", "");
            const std::string value = value_or<std::string>(triggers.at(i), "value", "");
            if (value.empty()) {
                continue;
            }
            if (type == "word" || type == "token") {
                s->call_words.push_back(value);
            } else if (type == "pattern" || type == "pattern_full") {
                s->call_patterns.push_back(value);
            }
        }
        if (s->params.is_continuation) {
            // as task_result_state: no delta repeats the prefilled assistant text
            s->msg = common_chat_parse("", true, s->params);
        }
        *out = s.release();
    }, MTP_ERR_ARG);
}

MTP_EXPORT void mtp_chat_stream_free(mtp_chat_stream * s) {
    delete s;
}

MTP_EXPORT int32_t mtp_chat_stream_update(mtp_chat_stream * s, const char * text, size_t n_text, int32_t is_partial,
                                          char ** out_json) {
    return guarded([&] {
        if (!s || !out_json || (!text && n_text)) {
            fail(MTP_ERR_NULL, "mtp_chat_stream_update: NULL argument");
        }
        *out_json = nullptr;
        *out_json = to_c_string(update(*s, std::string(text ? text : "", n_text), is_partial != 0).dump());
    });
}

MTP_EXPORT void mtp_string_free(char * s) {
    std::free(s);
}

MTP_EXPORT int32_t mtp_grammar_sampler_new(const struct llama_vocab * vocab, const char * grammar, int32_t lazy,
                                           const char ** patterns, int32_t n_patterns, const int32_t * tokens,
                                           int32_t n_tokens, const int32_t * prefill, int32_t n_prefill,
                                           struct llama_sampler ** out) {
    llama_sampler * smpl = nullptr;
    const int32_t status = guarded([&] {
        if (!vocab || !grammar || !out || (n_patterns && !patterns) || (n_tokens && !tokens) || (n_prefill && !prefill)) {
            fail(MTP_ERR_NULL, "mtp_grammar_sampler_new: NULL argument");
        }
        if (n_patterns < 0 || n_tokens < 0 || n_prefill < 0) {
            fail(MTP_ERR_ARG, "mtp_grammar_sampler_new: negative count");
        }
        *out = nullptr;
        // as common_sampler_init (common/sampling.cpp)
        smpl = lazy ? llama_sampler_init_grammar_lazy_patterns(vocab, grammar, "root", patterns, n_patterns,
                                                               tokens, n_tokens)
                    : llama_sampler_init_grammar(vocab, grammar, "root");
        if (!smpl) {
            fail(MTP_ERR_ARG, "the grammar does not parse");
        }
        for (int32_t i = 0; i < n_prefill; ++i) {
            llama_sampler_accept(smpl, prefill[i]);  // upstream throws if the prompt breaks the grammar
        }
        *out = smpl;
    }, MTP_ERR_ARG);
    if (status != MTP_OK && smpl) {
        llama_sampler_free(smpl);
    }
    return status;
}

MTP_EXPORT int32_t mtp_sampler_sample(struct llama_sampler * smpl, struct llama_context * ctx, int32_t idx,
                                      int32_t * token, int32_t * refused) {
    return guarded([&] {
        if (!smpl || !ctx || !token || !refused) {
            fail(MTP_ERR_NULL, "mtp_sampler_sample: NULL argument");
        }
        *refused = 0;
        // llama_sampler_sample (src/llama-sampler.cpp) on the CPU path, with the accept guarded
        llama_token chosen = llama_get_sampled_token_ith(ctx, idx);
        if (chosen == LLAMA_TOKEN_NULL) {
            const float *       sampled_probs  = llama_get_sampled_probs_ith(ctx, idx);
            const float *       sampled_logits = llama_get_sampled_logits_ith(ctx, idx);
            const llama_token * sampled_ids    = llama_get_sampled_candidates_ith(ctx, idx);
            thread_local std::vector<llama_token_data> cur;
            if (sampled_probs) {
                cur.resize(llama_get_sampled_probs_count_ith(ctx, idx));
                for (size_t i = 0; i < cur.size(); ++i) {
                    cur[i] = llama_token_data{sampled_ids[i], sampled_logits[i], sampled_probs[i]};
                }
            } else if (sampled_logits) {
                cur.resize(llama_get_sampled_logits_count_ith(ctx, idx));
                for (size_t i = 0; i < cur.size(); ++i) {
                    cur[i] = llama_token_data{sampled_ids[i], sampled_logits[i], 0.0f};
                }
            } else {
                const float * logits = llama_get_logits_ith(ctx, idx);
                if (!logits) {
                    fail(MTP_ERR_ARG, "batch row %d of the last decode has no logits", idx);
                }
                cur.resize(llama_vocab_n_tokens(llama_model_get_vocab(llama_get_model(ctx))));
                for (size_t t = 0; t < cur.size(); ++t) {
                    cur[t] = llama_token_data{(llama_token) t, logits[t], 0.0f};
                }
            }
            llama_token_data_array cur_p = {cur.data(), cur.size(), -1, false};
            llama_sampler_apply(smpl, &cur_p);
            if (cur_p.selected < 0 || cur_p.selected >= (int64_t) cur_p.size) {
                fail(MTP_ERR_ARG, "the sampler chain selected no token (a grammar that allows none?)");
            }
            chosen = cur_p.data[cur_p.selected].id;
        }
        *token = chosen;
        try {
            llama_sampler_accept(smpl, chosen);
        } catch (const std::exception & e) {
            // a grammar refused what it had let through (a lazy grammar's trigger inside a token
            // whose remaining text breaks the rules): upstream would terminate the process here
            *refused = 1;
            throw mtp_failure{MTP_OK, e.what()};  // guarded(): status MTP_OK, the reason kept as the last error
        }
    });
}
