//! Cache-key computation: parse, canonicalize and hash a chat request of 1 KiB, 32 KiB and
//! 256 KiB. Beside it, what a request about to go upstream pays on top for the digests of
//! the prefixes the provider caches (`llm_dedup::prefix`: the body parsed again, then
//! digested); the key path itself does not take them, so a hit never pays for them.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use llm_dedup::KeyPolicy;
use llm_dedup::Route;
use llm_dedup::unstable::Prefixes;
use llm_dedup::unstable::{CanonicalBody, CredentialFingerprint, KeyParts, Partition};
use serde_json::{Value, json};

/// A chat request of about `size` bytes: a system prompt, then user/assistant turns.
fn chat_request(size: usize) -> Vec<u8> {
    let mut messages = vec![json!({"role": "system", "content": "You are a careful assistant."})];
    let mut body = Vec::new();
    let mut turn = 0;
    while body.len() < size {
        let role = if turn % 2 == 0 { "user" } else { "assistant" };
        messages.push(json!({"role": role, "content":
            format!("Turn {turn}: please summarise the quarterly report section by section.")}));
        body = serde_json::to_vec(&json!({"model": "gpt-4o-mini", "temperature": 0.2,
            "max_tokens": 512, "user": "bench", "messages": messages}))
        .expect("serializable");
        turn += 1;
    }
    body
}

fn key_of(bytes: &[u8], policy: &KeyPolicy) -> llm_dedup::CacheKey {
    let value: Value = serde_json::from_slice(bytes).expect("valid JSON");
    key_of_value(&value, policy)
}

/// The prefix digests of one request as a leader takes them before its call: parsed again.
fn prefixes_of(bytes: &[u8], partition: &Partition) -> Prefixes {
    let value: Value = serde_json::from_slice(bytes).expect("valid JSON");
    Prefixes::of(Route::ChatCompletions, &value, bytes.len(), partition)
}

fn key_of_value(value: &Value, policy: &KeyPolicy) -> llm_dedup::CacheKey {
    let body = CanonicalBody::new(Route::ChatCompletions, value, policy);
    KeyParts {
        namespace: "",
        upstream: "https://api.openai.com",
        method: "POST",
        path_and_query: "/v1/chat/completions",
        credential: CredentialFingerprint::new(&[9; 32], [("authorization", &b"Bearer sk-x"[..])]),
        behaviour: &[],
        body: &body,
        exact_body: None,
    }
    .key()
}

fn bench(c: &mut Criterion) {
    let policy = KeyPolicy::default();
    let mut group = c.benchmark_group("key");
    let partition = Partition::from_bytes([7; 32]);
    for (name, size) in [("1KiB", 1024), ("32KiB", 32 * 1024), ("256KiB", 256 * 1024)] {
        let request = chat_request(size);
        group.throughput(Throughput::Bytes(request.len() as u64));
        group.bench_function(format!("parse+canonicalize+hash/{name}"), |b| {
            b.iter(|| key_of(black_box(&request), &policy))
        });
        group.bench_function(format!("prefixes, on a miss/{name}"), |b| {
            b.iter(|| prefixes_of(black_box(&request), &partition))
        });
        // Baseline in the same run: parsing alone, which any JSON-aware proxy must do.
        group.bench_function(format!("parse-only baseline/{name}"), |b| {
            b.iter(|| serde_json::from_slice::<Value>(black_box(&request)).expect("valid"))
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
