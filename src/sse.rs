//! Server-sent events: splitting a byte stream into events, and telling when a stream is
//! complete.
//!
//! This module owns the knowledge of the three stream framings llm-dedup caches (Chat
//! Completions and legacy completions: `data:` lines ending in `data: [DONE]`; the Responses
//! API: named events ending in `response.completed`; Anthropic Messages: `message_start` ...
//! `message_stop`, with `ping`s). It is pure: bytes in, events and verdicts out. Events are
//! kept byte for byte, unknown event types included, so a replay is the stream as it came.

use bytes::{Bytes, BytesMut};
use serde_json::Value;

use crate::route::{MAX_MODEL_CHARS, Route};
use crate::usage::Usage;

/// Splits a byte stream into complete events, each with its terminating blank line.
///
/// Each byte is looked at once, however the stream is cut into chunks. What waits for the end
/// of its event is bounded ([`EventSplitter::bounded`]): an event that outgrows the bound is
/// never an event this proxy can store, so from then on the splitter hands bytes on as they
/// come, unsplit ([`EventSplitter::overflowed`]).
#[derive(Debug)]
pub struct EventSplitter {
    pending: BytesMut,
    /// How much of `pending` was looked at without finding the end of an event.
    scanned: usize,
    /// Whether the line being scanned has no character yet.
    line_empty: bool,
    /// Most bytes held while an event is incomplete.
    bound: usize,
    overflowed: bool,
    /// Bytes looked at, for the test that checks each is looked at once.
    #[cfg(test)]
    looked_at: usize,
}

impl Default for EventSplitter {
    /// A splitter holding whatever an event needs: for bytes already bounded (a stored stream).
    fn default() -> Self {
        EventSplitter::bounded(usize::MAX)
    }
}

impl EventSplitter {
    /// A splitter that holds at most `bound` bytes of an incomplete event.
    pub fn bounded(bound: usize) -> EventSplitter {
        EventSplitter {
            pending: BytesMut::new(),
            scanned: 0,
            line_empty: true,
            bound,
            overflowed: false,
            #[cfg(test)]
            looked_at: 0,
        }
    }

    /// Adds bytes and returns the events they complete; once the splitter has overflowed, the
    /// bytes themselves.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<Bytes> {
        if self.overflowed {
            return if bytes.is_empty() {
                Vec::new()
            } else {
                vec![Bytes::copy_from_slice(bytes)]
            };
        }
        self.pending.extend_from_slice(bytes);
        let mut events = Vec::new();
        while let Some(end) = self.next_end() {
            events.push(self.pending.split_to(end).freeze());
        }
        if self.pending.len() > self.bound {
            self.overflowed = true;
            events.push(self.pending.split().freeze());
            self.scanned = 0;
        }
        events
    }

    /// Whether an event outgrew the bound: what `push` returns since is bytes, not events.
    pub fn overflowed(&self) -> bool {
        self.overflowed
    }

    /// What is left after the last complete event (a stream cut mid-event).
    pub fn rest(&mut self) -> Option<Bytes> {
        self.scanned = 0;
        self.line_empty = true;
        (!self.pending.is_empty()).then(|| self.pending.split().freeze())
    }

    /// The length of the first complete event in `pending` (through its blank line), if any,
    /// looking only at the bytes not looked at before. A blank line is two line ends in a row;
    /// a line end is `\n`, `\r\n` or `\r`.
    fn next_end(&mut self) -> Option<usize> {
        let buf = &self.pending[..];
        let mut i = self.scanned;
        while i < buf.len() {
            #[cfg(test)]
            {
                self.looked_at += 1;
            }
            let len = match buf[i] {
                b'\n' => 1,
                b'\r' if buf.get(i + 1) == Some(&b'\n') => 2,
                // Might be the start of \r\n: looked at again with the next bytes.
                b'\r' if i + 1 == buf.len() => break,
                b'\r' => 1,
                _ => {
                    self.line_empty = false;
                    i += 1;
                    continue;
                }
            };
            i += len;
            if self.line_empty {
                self.scanned = 0;
                return Some(i);
            }
            self.line_empty = true;
        }
        self.scanned = i;
        None
    }
}

/// The `event:` name and joined `data:` of one event.
fn fields(event: &[u8]) -> (Option<String>, String) {
    let text = String::from_utf8_lossy(event);
    let mut name = None;
    let mut data = Vec::new();
    for line in text.lines() {
        if let Some(v) = line.strip_prefix("event:") {
            name = Some(v.trim().to_owned());
        } else if let Some(v) = line.strip_prefix("data:") {
            data.push(v.strip_prefix(' ').unwrap_or(v));
        }
    }
    (name, data.join("\n"))
}

/// How a stream ended, as far as its events tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// No end marker yet.
    Open,
    /// Ended with the protocol's success marker and no error event.
    Complete,
    /// Carried an error event, or ended with a failure marker.
    Failed,
}

/// Follows a stream's events and tells whether it completed; collects its token usage and
/// the model it reports.
#[derive(Debug)]
pub struct Completion {
    route: Route,
    verdict: Verdict,
    usage: Usage,
    model: Option<String>,
}

impl Completion {
    /// A tracker for a stream on `route`.
    pub fn new(route: Route) -> Completion {
        Completion {
            route,
            verdict: Verdict::Open,
            usage: Usage::default(),
            model: None,
        }
    }

    /// Looks at the next event.
    pub fn observe(&mut self, event: &[u8]) {
        if self.verdict == Verdict::Failed {
            return;
        }
        let (name, data) = fields(event);
        let json: Option<Value> = serde_json::from_str(&data).ok();
        let has_error = json
            .as_ref()
            .and_then(|j| j.get("error"))
            .is_some_and(|e| !e.is_null());
        if name.as_deref() == Some("error") || has_error {
            self.verdict = Verdict::Failed;
            return;
        }
        match self.route {
            Route::ChatCompletions | Route::Completions => {
                if data.trim() == "[DONE]" {
                    self.verdict = Verdict::Complete;
                    return;
                }
                self.take_model(json.as_ref(), "/model");
                if let Some(usage) = json.as_ref().and_then(|j| j.get("usage")) {
                    self.take_usage(usage);
                }
            }
            Route::Responses => match name.as_deref().unwrap_or("") {
                "response.created" => self.take_model(json.as_ref(), "/response/model"),
                "response.completed" => {
                    self.verdict = Verdict::Complete;
                    self.take_model(json.as_ref(), "/response/model");
                    if let Some(u) = json.as_ref().and_then(|j| j.pointer("/response/usage")) {
                        self.take_usage(u);
                    }
                }
                "response.failed" | "response.incomplete" => self.verdict = Verdict::Failed,
                _ => {}
            },
            Route::AnthropicMessages => match name.as_deref().unwrap_or("") {
                "message_stop" => self.verdict = Verdict::Complete,
                "message_start" => {
                    self.take_model(json.as_ref(), "/message/model");
                    if let Some(u) = json.as_ref().and_then(|j| j.pointer("/message/usage")) {
                        self.take_usage(u);
                    }
                }
                "message_delta" => {
                    if let Some(u) = json.as_ref().and_then(|j| j.get("usage")) {
                        self.take_usage(u);
                    }
                }
                _ => {}
            },
            // Embeddings and moderations do not stream; nothing marks an end.
            Route::Embeddings | Route::Moderations => {}
        }
    }

    fn take_usage(&mut self, usage: &Value) {
        self.usage = self.usage.updated_by(Usage::read(usage));
    }

    /// Keeps the model named at `pointer` in `json`, the first time one is named.
    fn take_model(&mut self, json: Option<&Value>, pointer: &str) {
        if self.model.is_none() {
            let named = json.and_then(|j| j.pointer(pointer)?.as_str());
            self.model = named.map(|m| m.chars().take(MAX_MODEL_CHARS).collect());
        }
    }

    /// The verdict so far.
    pub fn verdict(&self) -> Verdict {
        self.verdict
    }

    /// Token usage reported by the stream.
    pub fn usage(&self) -> Usage {
        self.usage
    }

    /// The model the stream reports, if it named one.
    pub fn model(&self) -> Option<&str> {
        self.model.as_deref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(route: Route, text: &str) -> (Vec<Bytes>, Verdict, Usage) {
        let mut split = EventSplitter::default();
        let mut done = Completion::new(route);
        let mut events = Vec::new();
        // Feed in awkward pieces: events split across chunks must come out whole.
        for piece in text.as_bytes().chunks(7) {
            for e in split.push(piece) {
                done.observe(&e);
                events.push(e);
            }
        }
        events.extend(split.rest());
        (events, done.verdict(), done.usage())
    }

    #[test]
    fn chat_streams_end_with_done_and_report_usage() {
        let text = "data: {\"choices\":[{\"delta\":{\"content\":\"Hi\"}}]}\n\n\
                    data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":1,\"total_tokens\":4}}\n\n\
                    data: [DONE]\n\n";
        let (events, verdict, usage) = run(Route::ChatCompletions, text);
        assert_eq!(events.len(), 3);
        assert_eq!(events.concat(), text.as_bytes(), "byte for byte");
        assert_eq!(verdict, Verdict::Complete);
        assert_eq!(usage.total_tokens, Some(4));
    }

    #[test]
    fn cut_and_errored_streams_are_not_complete() {
        let cut = "data: {\"choices\":[]}\n\ndata: {\"choi";
        let (events, verdict, _) = run(Route::ChatCompletions, cut);
        assert_eq!(verdict, Verdict::Open);
        assert_eq!(events.concat(), cut.as_bytes(), "the partial event is kept");
        let errored = "data: {\"choices\":[]}\n\ndata: {\"error\":{\"message\":\"boom\"}}\n\ndata: [DONE]\n\n";
        assert_eq!(run(Route::ChatCompletions, errored).1, Verdict::Failed);
    }

    #[test]
    fn responses_streams_end_with_a_terminal_event() {
        let ok = "event: response.created\ndata: {\"response\":{\"error\":null}}\n\n\
                  event: response.output_text.delta\ndata: {\"delta\":\"Hi\"}\n\n\
                  event: response.completed\ndata: {\"response\":{\"usage\":{\"input_tokens\":5,\"output_tokens\":2}}}\n\n";
        let (_, verdict, usage) = run(Route::Responses, ok);
        assert_eq!((verdict, usage.total_tokens), (Verdict::Complete, Some(7)));
        let failed = "event: response.failed\ndata: {}\n\n";
        assert_eq!(run(Route::Responses, failed).1, Verdict::Failed);
    }

    #[test]
    fn anthropic_streams_end_with_message_stop_and_keep_pings() {
        let text = "event: message_start\ndata: {\"message\":{\"usage\":{\"input_tokens\":10,\"output_tokens\":1}}}\n\n\
                    event: ping\ndata: {\"type\":\"ping\"}\n\n\
                    event: content_block_delta\ndata: {\"delta\":{\"text\":\"Hi\"}}\n\n\
                    event: message_delta\ndata: {\"usage\":{\"output_tokens\":6}}\n\n\
                    event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n";
        let (events, verdict, usage) = run(Route::AnthropicMessages, text);
        assert_eq!(events.len(), 5);
        assert_eq!(verdict, Verdict::Complete);
        assert_eq!(
            (usage.prompt_tokens, usage.completion_tokens),
            (Some(10), Some(6))
        );
        let err = "event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\"}}\n\n";
        assert_eq!(run(Route::AnthropicMessages, err).1, Verdict::Failed);
    }

    #[test]
    fn each_byte_is_looked_at_once_and_an_endless_event_is_not_held() {
        let mut split = EventSplitter::bounded(4096);
        let mut passed = Vec::new();
        // One byte at a time, an event that never ends: the old splitter rescanned its whole
        // buffer on every byte, and held all of it.
        for _ in 0..100_000 {
            passed.extend(split.push(b"x"));
            assert!(split.pending.len() <= 4097);
        }
        assert!(split.overflowed());
        assert!(
            split.looked_at <= 4097 * 2,
            "{} bytes looked at",
            split.looked_at
        );
        assert_eq!(passed.concat().len(), 100_000, "every byte passed on");

        let mut split = EventSplitter::bounded(1 << 20);
        let stream = "data: abc\r\n\r\n".repeat(1000);
        let events: Vec<Bytes> = stream
            .as_bytes()
            .iter()
            .flat_map(|b| split.push(std::slice::from_ref(b)))
            .collect();
        assert_eq!(events.len(), 1000);
        assert!(!split.overflowed());
        assert!(
            split.looked_at <= stream.len() + 2000,
            "{}",
            split.looked_at
        );
    }

    #[test]
    fn crlf_framing_is_split_too() {
        let text = "data: a\r\n\r\ndata: b\r\n\r\n";
        let (events, _, _) = run(Route::ChatCompletions, text);
        assert_eq!(
            events,
            vec![
                Bytes::from("data: a\r\n\r\n"),
                Bytes::from("data: b\r\n\r\n")
            ]
        );
    }

    use proptest::prelude::*;

    /// Events of a stream in pieces cut at `cuts`, and its verdict.
    fn split_at(route: Route, bytes: &[u8], cuts: &[usize]) -> (Vec<Bytes>, Verdict, Usage) {
        let mut split = EventSplitter::default();
        let mut done = Completion::new(route);
        let mut events = Vec::new();
        let mut at = 0;
        let mut ends: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
        ends.sort_unstable();
        ends.push(bytes.len());
        for end in ends {
            for e in split.push(&bytes[at..end.max(at)]) {
                done.observe(&e);
                events.push(e);
            }
            at = end.max(at);
        }
        events.extend(split.rest());
        (events, done.verdict(), done.usage())
    }

    proptest! {
        #![proptest_config(crate::fuzzing::config())]

        /// Fuzz target (c): any bytes, cut anywhere, split into events that join back into
        /// the input, the same events and the same verdict wherever the cuts fall.
        #[test]
        fn arbitrary_streams_cut_anywhere_split_the_same_and_lose_nothing(
            parts in prop::collection::vec(
                prop_oneof![
                    prop::sample::select(vec![
                        "data: ", "event: ", "\n", "\r", "\r\n", "\n\n", "[DONE]",
                        "{\"error\":{}}", "{\"usage\":{\"prompt_tokens\":3}}", "message_stop",
                        "response.completed", "ping", ":", "é",
                    ]).prop_map(|s| s.as_bytes().to_vec()),
                    prop::collection::vec(any::<u8>(), 0..16),
                ],
                0..40,
            ),
            cuts in prop::collection::vec(any::<usize>(), 0..12),
            route in prop::sample::select(vec![
                Route::ChatCompletions, Route::Responses, Route::AnthropicMessages,
                Route::Embeddings,
            ]),
        ) {
            let bytes: Vec<u8> = parts.concat();
            let (whole, verdict, usage) = split_at(route, &bytes, &[]);
            let (pieces, cut_verdict, cut_usage) = split_at(route, &bytes, &cuts);
            prop_assert_eq!(whole.concat(), bytes.clone());
            prop_assert_eq!(&pieces, &whole);
            prop_assert_eq!(cut_verdict, verdict);
            prop_assert_eq!(cut_usage, usage);
        }
    }

    #[test]
    fn each_framing_reports_the_model_it_names() {
        let cases = [
            (
                Route::ChatCompletions,
                "data: {\"model\":\"gpt-4o-mini-2024-07-18\",\"choices\":[]}\n\ndata: [DONE]\n\n",
                "gpt-4o-mini-2024-07-18",
            ),
            (
                Route::Responses,
                "event: response.created\ndata: {\"response\":{\"model\":\"o3-2025-04-16\"}}\n\n",
                "o3-2025-04-16",
            ),
            (
                Route::AnthropicMessages,
                "event: message_start\ndata: {\"message\":{\"model\":\"claude-sonnet-4-5-20250929\",\"usage\":{\"input_tokens\":3,\"cache_read_input_tokens\":7}}}\n\n",
                "claude-sonnet-4-5-20250929",
            ),
        ];
        for (route, text, model) in cases {
            let mut split = EventSplitter::default();
            let mut done = Completion::new(route);
            for e in split.push(text.as_bytes()) {
                done.observe(&e);
            }
            assert_eq!(done.model(), Some(model), "{route:?}");
        }
    }
}
