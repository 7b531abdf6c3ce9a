//! What providers charge per token, and so what an answer from the cache saved.
//!
//! This module owns the price table (`data/prices.json`, built into the binary, extended or
//! overridden at run time with `--prices FILE` in the same format), the lookup of a model name
//! as providers report it (dated snapshots priced as their model unless listed themselves),
//! and the arithmetic: prices are read as exact decimals into integer picodollars per token,
//! and a saving is an integer count of nanodollars ([`Usd`]). Nothing is ever accumulated in
//! floating point; a float is made only to print. It is a leaf: it imports nothing of the
//! crate but `usage`.
//!
//! A model without a price saves tokens but no money: [`PriceTable::cost`] says `None`, never
//! a guess. The same holds for an answer whose usage needs a price the table does not have (a
//! cache write on a model listed without a cache-write price).

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::LazyLock;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::usage::Usage;

/// The price table shipped with llm-dedup, read when the binary is built.
const BUILT_IN: &str = include_str!("../data/prices.json");

/// The only unit a price file may state.
const UNIT: &str = "USD per million tokens";

/// The highest price accepted, in USD per million tokens: far above any model's, low enough
/// that no product of a price and a token count overflows.
const MAX_PRICE_USD: u64 = 100_000;

/// An amount of US dollars, held as an integer count of nanodollars (10⁻⁹ USD): sums are
/// exact. Displayed as a plain decimal (`0.00045`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Usd(u64);

impl Usd {
    /// `nanos` nanodollars.
    pub const fn from_nanos(nanos: u64) -> Usd {
        Usd(nanos)
    }

    /// The amount in nanodollars.
    pub const fn nanos(self) -> u64 {
        self.0
    }

    /// The amount as a float, for JSON and Prometheus output only (exact to the nanodollar
    /// below about 9 million dollars). Never add these up.
    pub fn as_f64(self) -> f64 {
        self.0 as f64 / 1e9
    }
}

impl fmt::Display for Usd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (whole, frac) = (self.0 / 1_000_000_000, self.0 % 1_000_000_000);
        if frac == 0 {
            return write!(f, "{whole}");
        }
        let digits = format!("{frac:09}");
        write!(f, "{whole}.{}", digits.trim_end_matches('0'))
    }
}

/// One model's prices, each in picodollars per token (the same number as microdollars per
/// million tokens).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Price {
    /// Input tokens.
    pub input: u64,
    /// Input tokens read from the provider's prompt cache.
    pub cached_input: Option<u64>,
    /// Input tokens written to the provider's prompt cache (Anthropic's 5-minute writes).
    pub cache_write: Option<u64>,
    /// Output tokens (reasoning included); embedding models have none.
    pub output: Option<u64>,
}

impl Price {
    /// What the provider charges for `usage`, read the way it bills (see the `usage` module):
    /// uncached input at the input price, cached input at the cached-input price, cache writes
    /// at the cache-write price, output at the output price. `None` when `usage` reports no
    /// tokens, or tokens of a kind this model has no price for.
    pub fn cost(&self, usage: &Usage) -> Option<Usd> {
        if usage.prompt_tokens.is_none() && usage.completion_tokens.is_none() {
            return None;
        }
        let prompt = usage.prompt_tokens.unwrap_or(0);
        let cached = usage.cached_tokens.unwrap_or(0).min(prompt);
        let written = usage.cache_write_tokens.unwrap_or(0).min(prompt - cached);
        let plain = prompt - cached - written;
        let output = usage.completion_tokens.unwrap_or(0);
        // A count of zero needs no price; any other count needs its own.
        let at = |tokens: u64, price: Option<u64>| match (tokens, price) {
            (0, _) => Some(0u128),
            (n, Some(p)) => Some(u128::from(n) * u128::from(p)),
            (_, None) => None,
        };
        let pico = at(plain, Some(self.input))?
            + at(cached, self.cached_input)?
            + at(written, self.cache_write)?
            + at(output, self.output)?;
        // Picodollars to nanodollars, rounded half up.
        Some(Usd(u64::try_from((pico + 500) / 1000).unwrap_or(u64::MAX)))
    }
}

/// What one answer saved its caller: the provider's tokens, and their price when the model
/// has one (with the name it is priced as).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Saved<'a> {
    /// The tokens.
    pub usage: Usage,
    /// The model's name in the table and the amount, when priced.
    pub priced: Option<(&'a str, Usd)>,
}

/// Where a price table came from and how old its figures are, as `stats` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PricesInfo {
    /// The date the built-in figures were taken (`YYYY-MM-DD`).
    pub taken: String,
    /// Models priced.
    pub models: usize,
    /// The `--prices` file that extends or overrides the built-in table, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overrides: Option<PricesOverride>,
}

/// A `--prices` file, as [`PricesInfo`] reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PricesOverride {
    /// The file.
    pub file: String,
    /// The date its figures were taken.
    pub taken: String,
    /// Models it prices.
    pub models: usize,
}

/// Prices per model, by the names providers report.
#[derive(Debug, Clone)]
pub struct PriceTable {
    models: HashMap<String, Price>,
    info: PricesInfo,
}

/// A price file, as written (`data/prices.json` is one).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PriceFile {
    taken: String,
    #[serde(default)]
    unit: Option<String>,
    #[serde(default)]
    sources: BTreeMap<String, String>,
    models: BTreeMap<String, ModelPrices>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ModelPrices {
    #[serde(default)]
    source: Option<String>,
    input: Value,
    #[serde(default)]
    cached_input: Option<Value>,
    #[serde(default)]
    cache_write: Option<Value>,
    #[serde(default)]
    output: Option<Value>,
}

static BUILT_IN_TABLE: LazyLock<PriceTable> = LazyLock::new(|| {
    // Checked by the `built_in_table_reads` test: the data file ships with the source.
    PriceTable::parse(BUILT_IN).unwrap_or_else(|e| panic!("data/prices.json: {e}"))
});

impl PriceTable {
    /// The table built into the binary.
    pub fn built_in() -> PriceTable {
        BUILT_IN_TABLE.clone()
    }

    /// The built-in table extended and overridden by the price file `text` read from `file`:
    /// a model it lists is priced as it says, every other as built in.
    pub fn with_overrides(text: &str, file: &str) -> Result<PriceTable, String> {
        let extra = PriceTable::parse(text)?;
        let mut table = PriceTable::built_in();
        table.info.overrides = Some(PricesOverride {
            file: file.to_owned(),
            taken: extra.info.taken,
            models: extra.models.len(),
        });
        table.models.extend(extra.models);
        table.info.models = table.models.len();
        Ok(table)
    }

    /// Reads a price file; the error names what is wrong and where.
    pub fn parse(text: &str) -> Result<PriceTable, String> {
        let file: PriceFile = serde_json::from_str(text).map_err(|e| e.to_string())?;
        if !is_date(&file.taken) {
            return Err(format!(
                "\"taken\" must be a date (YYYY-MM-DD), not {:?}",
                file.taken
            ));
        }
        if let Some(unit) = file.unit.as_deref().filter(|u| *u != UNIT) {
            return Err(format!("\"unit\" must be {UNIT:?}, not {unit:?}"));
        }
        let mut models = HashMap::with_capacity(file.models.len());
        for (name, m) in file.models {
            let at = |what: &str, e: String| format!("models.{name}.{what}: {e}");
            if let Some(source) = m.source.as_deref()
                && !file.sources.contains_key(source)
            {
                return Err(at("source", format!("{source:?} is not in \"sources\"")));
            }
            let optional = |what: &str, v: Option<Value>| {
                v.map(|v| per_token(&v).map_err(|e| at(what, e)))
                    .transpose()
            };
            let price = Price {
                input: per_token(&m.input).map_err(|e| at("input", e))?,
                cached_input: optional("cached_input", m.cached_input)?,
                cache_write: optional("cache_write", m.cache_write)?,
                output: optional("output", m.output)?,
            };
            models.insert(name.to_ascii_lowercase(), price);
        }
        Ok(PriceTable {
            info: PricesInfo {
                taken: file.taken,
                models: models.len(),
                overrides: None,
            },
            models,
        })
    }

    /// Where the figures come from and their date.
    pub fn info(&self) -> &PricesInfo {
        &self.info
    }

    /// The price of `model` as a provider reports it, and the name it is listed under: the
    /// name itself, or without its snapshot date (`gpt-4o-mini-2024-07-18` is `gpt-4o-mini`,
    /// `claude-sonnet-4-5-20250929` is `claude-sonnet-4-5`) unless the snapshot is listed
    /// itself. Azure's `gpt-35-turbo` is OpenAI's `gpt-3.5-turbo`.
    pub(crate) fn lookup(&self, model: &str) -> Option<(&str, &Price)> {
        // The common case first, without allocating: a name as listed, or its snapshot.
        for candidate in [Some(model), undated(model)].into_iter().flatten() {
            if let Some((listed, price)) = self.models.get_key_value(candidate) {
                return Some((listed.as_str(), price));
            }
        }
        let lower = model.trim().to_ascii_lowercase();
        let azure = lower.replace("gpt-35", "gpt-3.5");
        for name in [lower.as_str(), azure.as_str()] {
            for candidate in [Some(name), undated(name)].into_iter().flatten() {
                if let Some((listed, price)) = self.models.get_key_value(candidate) {
                    return Some((listed.as_str(), price));
                }
            }
        }
        None
    }

    /// What `usage` of `model` costs, and the name the model is priced as; `None` if the
    /// model has no price or the usage cannot be priced.
    pub fn cost(&self, model: &str, usage: &Usage) -> Option<(&str, Usd)> {
        let (name, price) = self.lookup(model)?;
        Some((name, price.cost(usage)?))
    }
}

impl Default for PriceTable {
    fn default() -> PriceTable {
        PriceTable::built_in()
    }
}

/// `name` without a trailing snapshot date (`-2024-07-18` or `-20240718`), if it has one.
fn undated(name: &str) -> Option<&str> {
    let dashed = |d: &str| {
        d.len() == 10
            && d.char_indices()
                .all(|(i, c)| matches!(i, 4 | 7) == (c == '-'))
            && d.bytes().filter(u8::is_ascii_digit).count() == 8
    };
    let compact = |d: &str| d.len() == 8 && d.bytes().all(|b| b.is_ascii_digit());
    for (len, is_date) in [(10, &dashed as &dyn Fn(&str) -> bool), (8, &compact)] {
        let cut = name.len().checked_sub(len + 1)?;
        if name.is_char_boundary(cut) && name[cut..].starts_with('-') && is_date(&name[cut + 1..]) {
            return Some(&name[..cut]);
        }
    }
    None
}

fn is_date(text: &str) -> bool {
    let b = text.as_bytes();
    b.len() == 10
        && b.iter().enumerate().all(|(i, c)| {
            if i == 4 || i == 7 {
                *c == b'-'
            } else {
                c.is_ascii_digit()
            }
        })
}

/// A price in USD per million tokens (a JSON string or number holding a plain decimal, at
/// most 6 decimal places) as picodollars per token, exactly.
fn per_token(value: &Value) -> Result<u64, String> {
    let text = match value {
        Value::String(s) => s.trim().to_owned(),
        Value::Number(n) => n.to_string(),
        other => return Err(format!("a price is a decimal number, not {other}")),
    };
    let bad = || format!("{text:?} is not a price in USD per million tokens (e.g. \"0.15\")");
    let (whole, frac) = text.split_once('.').unwrap_or((&text, ""));
    let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if whole.is_empty() || !digits(whole) || !digits(frac) {
        return Err(bad());
    }
    if frac.len() > 6 {
        return Err(format!("{text:?} has more than 6 decimal places"));
    }
    let whole: u64 = whole.parse().map_err(|_| bad())?;
    if whole > MAX_PRICE_USD {
        return Err(format!(
            "{text:?} is above {MAX_PRICE_USD} USD per million tokens"
        ));
    }
    let frac: u64 = format!("{frac:0<6}").parse().map_err(|_| bad())?;
    Ok(whole * 1_000_000 + frac)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usage(prompt: u64, completion: Option<u64>) -> Usage {
        Usage {
            prompt_tokens: Some(prompt),
            completion_tokens: completion,
            ..Usage::default()
        }
    }

    #[test]
    fn built_in_table_reads_and_every_model_names_its_source() {
        let file: PriceFile = serde_json::from_str(BUILT_IN).expect("data/prices.json is JSON");
        assert!(file.models.values().all(|m| m.source.is_some()));
        let table = PriceTable::built_in();
        assert_eq!(table.info().models, file.models.len());
        for model in ["gpt-4o-mini", "gpt-4.1", "gpt-5", "o3", "claude-sonnet-4-5"] {
            assert!(table.lookup(model).is_some(), "{model}");
        }
        assert!(table.lookup("text-embedding-3-small").is_some());
    }

    #[test]
    fn prices_are_exact_decimals() {
        let p = |s: &str| per_token(&Value::from(s));
        assert_eq!(p("0.15"), Ok(150_000));
        assert_eq!(p("0.075"), Ok(75_000));
        assert_eq!(p("18.75"), Ok(18_750_000));
        assert_eq!(p("15"), Ok(15_000_000));
        assert_eq!(p("0.000001"), Ok(1));
        assert_eq!(per_token(&serde_json::json!(0.075)), Ok(75_000));
        for bad in ["", "-1", "1e3", "0.0000001", "abc", "1.2.3", "100001"] {
            assert!(p(bad).is_err(), "{bad:?}");
        }
        assert!(per_token(&Value::Null).is_err());
    }

    #[test]
    fn what_answers_cost() {
        let table = PriceTable::built_in();
        // gpt-4o-mini: 1,000 in at 0.15, 500 out at 0.60 per million.
        let chat = table.cost("gpt-4o-mini", &usage(1000, Some(500)));
        assert_eq!(chat, Some(("gpt-4o-mini", Usd::from_nanos(450_000))));
        // 1,920 of 2,006 input tokens cached (0.075): 86 x 0.15 + 1920 x 0.075 + 300 x 0.60.
        let cached = Usage {
            cached_tokens: Some(1920),
            ..usage(2006, Some(300))
        };
        let cost = table.cost("gpt-4o-mini-2024-07-18", &cached);
        assert_eq!(cost, Some(("gpt-4o-mini", Usd::from_nanos(336_900))));
        // Anthropic: 21 plain (3), 188,086 written (3.75), 1,000 read (0.30), 393 out (15).
        let anthropic = Usage {
            cached_tokens: Some(1000),
            cache_write_tokens: Some(188_086),
            ..usage(189_107, Some(393))
        };
        let cost = table.cost("claude-sonnet-4-5-20250929", &anthropic);
        assert_eq!(
            cost,
            Some(("claude-sonnet-4-5", Usd::from_nanos(711_580_500)))
        );
        // Embeddings: 9 tokens at 0.02 per million.
        let cost = table.cost("text-embedding-3-small", &usage(9, None));
        assert_eq!(cost, Some(("text-embedding-3-small", Usd::from_nanos(180))));
        // No price: no money, never a guess.
        assert_eq!(table.cost("my-own-model", &usage(10, Some(10))), None);
        assert_eq!(table.cost("gpt-4o-mini", &Usage::default()), None);
        // Output on an embedding model, or a cache write without a cache-write price: unpriced.
        assert_eq!(
            table.cost("text-embedding-3-small", &usage(9, Some(1))),
            None
        );
        let written = Usage {
            cache_write_tokens: Some(5),
            ..usage(10, Some(1))
        };
        assert_eq!(table.cost("gpt-4o-mini", &written), None);
    }

    #[test]
    fn snapshots_and_azure_names_find_their_model() {
        let table = PriceTable::built_in();
        let name = |m: &str| table.lookup(m).map(|(n, _)| n.to_owned());
        assert_eq!(
            name("gpt-4o-mini-2024-07-18").as_deref(),
            Some("gpt-4o-mini")
        );
        assert_eq!(name("GPT-4o-Mini").as_deref(), Some("gpt-4o-mini"));
        assert_eq!(
            name("claude-3-5-haiku-20241022").as_deref(),
            Some("claude-3-5-haiku")
        );
        assert_eq!(name("gpt-35-turbo").as_deref(), Some("gpt-3.5-turbo"));
        // A snapshot listed itself keeps its own price.
        assert_eq!(
            name("gpt-4o-2024-05-13").as_deref(),
            Some("gpt-4o-2024-05-13")
        );
        assert_eq!(name("gpt-4o-2024-08-06").as_deref(), Some("gpt-4o"));
        for unknown in [
            "",
            "-2024-07-18",
            "gpt-4o-mini-2024-7-18",
            "ft:gpt-4o-mini:org::x",
        ] {
            assert_eq!(name(unknown), None, "{unknown:?}");
        }
    }

    #[test]
    fn an_override_file_extends_and_replaces() {
        let text = r#"{"taken": "2026-11-30", "models": {
            "gpt-4o-mini": {"input": "1", "output": "2"},
            "house-model": {"input": 0.5, "output": 1}}}"#;
        let table = PriceTable::with_overrides(text, "mine.json").expect("reads");
        let cost = |m: &str| table.cost(m, &usage(1_000_000, Some(1_000_000)));
        assert_eq!(
            cost("gpt-4o-mini"),
            Some(("gpt-4o-mini", Usd::from_nanos(3_000_000_000)))
        );
        assert_eq!(
            cost("house-model"),
            Some(("house-model", Usd::from_nanos(1_500_000_000)))
        );
        assert_eq!(
            cost("gpt-4.1").map(|(_, c)| c.to_string()).as_deref(),
            Some("10")
        );
        let info = table.info();
        assert_eq!(info.overrides.as_ref().map(|o| o.models), Some(2));
        assert_eq!(info.taken, PriceTable::built_in().info().taken);

        for (bad, says) in [
            ("{", "EOF"),
            (r#"{"taken": "yesterday", "models": {}}"#, "taken"),
            (
                r#"{"taken": "2026-01-01", "unit": "EUR", "models": {}}"#,
                "unit",
            ),
            (
                r#"{"taken": "2026-01-01", "models": {"m": {"input": "-1"}}}"#,
                "models.m.input",
            ),
            (
                r#"{"taken": "2026-01-01", "models": {"m": {"input": "1", "colour": 1}}}"#,
                "colour",
            ),
            (
                r#"{"taken": "2026-01-01", "models": {"m": {"input": "1", "source": "x"}}}"#,
                "source",
            ),
        ] {
            let e = PriceTable::with_overrides(bad, "f").expect_err(bad);
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn amounts_print_as_plain_decimals() {
        assert_eq!(Usd::from_nanos(0).to_string(), "0");
        assert_eq!(Usd::from_nanos(180).to_string(), "0.00000018");
        assert_eq!(Usd::from_nanos(450_000).to_string(), "0.00045");
        assert_eq!(Usd::from_nanos(1_500_000_000).to_string(), "1.5");
        assert_eq!(Usd::from_nanos(711_580_500).as_f64(), 0.7115805);
    }
}
