//! The inspector subcommands' output: tables, sizes and durations for people, JSON for
//! scripts. Every query is the library's (`llm_dedup::inspect`); this module only renders.

use std::borrow::Cow;
use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, IsTerminal, Write};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use bytesize::ByteSize;
use comfy_table::{CellAlignment, Table, presets::UTF8_FULL_CONDENSED};
use indicatif::{ProgressBar, ProgressStyle};
use llm_dedup::Counts;
use llm_dedup::inspect::{EntrySummary, ExportedEntry, Group, Selection, SortBy};

use crate::cli::args::{
    ExportArgs, ImportArgs, ListArgs, PurgeArgs, ShowArgs, SortArg, StatsArgs, read_prices,
};

/// The time a Unix-ms timestamp from the database stands for.
fn at(ms: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}

/// A duration in its two largest units: `45s`, `12m 5s`, `3h 5m`, `4d 2h`.
fn short(d: Duration) -> String {
    let s = d.as_secs();
    let (d_, h, m, sec) = (s / 86_400, s % 86_400 / 3600, s % 3600 / 60, s % 60);
    match (d_, h, m) {
        (0, 0, 0) => format!("{sec}s"),
        (0, 0, _) => format!("{m}m {sec}s"),
        (0, _, _) => format!("{h}h {m}m"),
        _ => format!("{d_}d {h}h"),
    }
}

/// How long ago a Unix-ms time was.
fn ago(ms: i64) -> String {
    let d = SystemTime::now().duration_since(at(ms)).unwrap_or_default();
    format!("{} ago", short(d))
}

/// How long until a Unix-ms time, or `expired`.
fn until(ms: i64) -> String {
    match at(ms).duration_since(SystemTime::now()) {
        Ok(left) if !left.is_zero() => format!("in {}", short(left)),
        _ => "expired".into(),
    }
}

/// A stored string as it may reach an operator's terminal: every control character escaped
/// (`\u{1b}`), so that a client-chosen model name or body cannot move the cursor, retitle the
/// window or clear the screen.
fn shown(text: &str) -> Cow<'_, str> {
    shown_keeping(text, &[])
}

/// [`shown`] for text of several lines: line ends and tabs are kept.
fn shown_lines(text: &str) -> Cow<'_, str> {
    shown_keeping(text, &['\n', '\t'])
}

fn shown_keeping<'a>(text: &'a str, kept: &[char]) -> Cow<'a, str> {
    let escaped = |c: char| c.is_control() && !kept.contains(&c);
    if !text.chars().any(escaped) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        if escaped(c) {
            out.extend(c.escape_unicode());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// An amount of nanodollars as dollars, exactly: `$0.00045`.
fn money(nanos: i64) -> String {
    format!(
        "${}",
        llm_dedup::Usd::from_nanos(u64::try_from(nanos).unwrap_or(0))
    )
}

fn size(bytes: u64) -> String {
    ByteSize(bytes).to_string()
}

fn percent(part: i64, whole: i64) -> String {
    if whole <= 0 {
        "-".into()
    } else {
        format!("{:.1}%", part as f64 * 100.0 / whole as f64)
    }
}

fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_style(UTF8_FULL_CONDENSED).set_header(header);
    t
}

fn right_align(t: &mut Table, from: usize) {
    for i in from..t.column_count() {
        if let Some(c) = t.column_mut(i) {
            c.set_cell_alignment(CellAlignment::Right);
        }
    }
}

fn print_json(value: &impl serde::Serialize) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

const COUNT_HEADER: [&str; 12] = [
    "requests",
    "hits",
    "coalesced",
    "partial",
    "misses",
    "bypasses",
    "upstream calls",
    "429s absorbed",
    "saved requests",
    "saved tokens (prompt / completion)",
    "saved USD",
    "embedding inputs saved",
];

fn count_cells(c: &Counts) -> Vec<String> {
    let saved = c.hits + c.coalesced;
    vec![
        c.requests.to_string(),
        format!("{} ({})", c.hits, percent(c.hits, c.requests)),
        format!("{} ({})", c.coalesced, percent(c.coalesced, c.requests)),
        c.partials.to_string(),
        c.misses.to_string(),
        c.bypasses.to_string(),
        c.upstream_calls.to_string(),
        c.upstream_429s.to_string(),
        format!("{saved} ({})", percent(saved, c.requests)),
        format!("{} / {}", c.saved_prompt_tokens, c.saved_completion_tokens),
        match (c.saved_nanodollars, c.saved_unpriced) {
            (0, 0) => "-".to_owned(),
            (0, _) => "no price".to_owned(),
            (n, 0) => money(n),
            (n, unpriced) => format!("{} (+{unpriced} with no price)", money(n)),
        },
        if c.inputs == 0 {
            "-".to_owned()
        } else {
            format!(
                "{} of {} ({})",
                c.inputs_saved,
                c.inputs,
                percent(c.inputs_saved, c.inputs)
            )
        },
    ]
}

fn groups_table(title: &str, groups: &[Group]) -> Table {
    let mut header = vec![title];
    header.extend(COUNT_HEADER);
    let mut t = table(&header);
    for g in groups {
        let name = if g.name.is_empty() { "(none)" } else { &g.name };
        let mut row = vec![shown(name).into_owned()];
        row.extend(count_cells(&g.counts));
        t.add_row(row);
    }
    right_align(&mut t, 1);
    t
}

/// `stats --redis`: what a fleet's shared tier holds.
fn fleet_stats(mut fleet: llm_dedup::inspect::FleetInspector, json: bool) -> Result<()> {
    let s = fleet.stats()?;
    if json {
        return print_json(&s);
    }
    let mut t = table(&["redis", &shown(&s.redis)]);
    if s.masters > 1 {
        t.add_row(vec![
            "cluster".into(),
            format!("{} masters read", s.masters),
        ]);
    }
    t.add_row(vec![
        "entries".into(),
        format!("{} ({} in Redis)", s.entries, size(s.value_bytes)),
    ]);
    if s.untrusted > 0 {
        t.add_row(vec![
            "left out".into(),
            format!(
                "{} (not sealed with the fleet secret given, or unreadable)",
                s.untrusted
            ),
        ]);
    }
    println!("{t}");
    for (title, groups) in [("model", &s.by_model), ("route", &s.by_route)] {
        if groups.is_empty() {
            continue;
        }
        let mut t = table(&[title, "entries", "size"]);
        for g in groups {
            let name = if g.name.is_empty() { "(none)" } else { &g.name };
            t.add_row(vec![
                shown(name).into_owned(),
                g.entries.to_string(),
                size(g.value_bytes),
            ]);
        }
        right_align(&mut t, 1);
        println!("\nBy {title}\n{t}");
    }
    println!("\nHit counts and savings are each replica's: see its /_llm-dedup/stats.");
    Ok(())
}

pub(crate) fn stats(args: &StatsArgs) -> Result<()> {
    if let Some(fleet) = args.db.fleet()? {
        return fleet_stats(fleet, args.json);
    }
    let mut s = args.db.open()?.stats()?;
    if let Some(file) = &args.prices {
        s.prices = read_prices(file)?.info().clone();
    }
    if args.json {
        return print_json(&s);
    }
    let mut t = table(&["database", &shown(&s.database)]);
    let when = |ms: Option<i64>| ms.map_or_else(|| "-".into(), ago);
    t.add_row(vec!["created".into(), when(s.created_at)]);
    t.add_row(vec![
        "entries".into(),
        format!(
            "{} ({} of answers, {} on disk)",
            s.entries,
            size(s.entry_bytes),
            size(s.file_bytes)
        ),
    ]);
    t.add_row(vec!["oldest entry".into(), when(s.oldest_entry_at)]);
    t.add_row(vec!["newest entry".into(), when(s.newest_entry_at)]);
    t.add_row(vec![
        "expired, awaiting sweep".into(),
        s.expired_entries.to_string(),
    ]);
    t.add_row(vec![
        "size bound (--max-disk)".into(),
        s.max_disk_bytes.map_or_else(|| "none".into(), size),
    ]);
    t.add_row(vec![
        "evicted".into(),
        format!(
            "{} expired, {} for size",
            s.evicted_expired, s.evicted_for_size
        ),
    ]);
    println!("{t}");
    let mut totals = table(&COUNT_HEADER);
    totals.add_row(count_cells(&s.totals));
    right_align(&mut totals, 0);
    println!("\nSince the database was created\n{totals}");
    println!(
        "Saved {} at the prices of {}{}{}",
        money(s.totals.saved_nanodollars),
        s.prices.taken,
        s.prices
            .overrides
            .as_ref()
            .map_or_else(String::new, |o| format!(
                " and of {} ({}, {} models)",
                shown(&o.file),
                o.taken,
                o.models
            )),
        match s.totals.saved_unpriced {
            0 => String::new(),
            n => format!("; {n} answers of models with no price saved tokens only"),
        }
    );
    if !s.by_model.is_empty() {
        println!("\nBy model\n{}", groups_table("model", &s.by_model));
    }
    if !s.by_route.is_empty() {
        println!("\nBy route\n{}", groups_table("route", &s.by_route));
    }
    Ok(())
}

fn entries_table(entries: &[EntrySummary]) -> Table {
    let mut t = table(&[
        "key", "route", "model", "answers", "size", "hits", "age", "expires",
    ]);
    for e in entries {
        t.add_row(vec![
            shown(e.key.get(..12).unwrap_or(&e.key)).into_owned(),
            shown(&e.route).into_owned(),
            e.model
                .as_deref()
                .map_or_else(|| "-".into(), |m| shown(m).into_owned()),
            e.answers.to_string(),
            size(e.size),
            e.hit_count.to_string(),
            ago(e.created_at).trim_end_matches(" ago").to_owned(),
            until(e.expires_at),
        ]);
    }
    right_align(&mut t, 3);
    t
}

pub(crate) fn list(args: &ListArgs) -> Result<()> {
    let selection = Selection {
        model: args.model.clone(),
        route: args.route.clone(),
        older_than: args.older_than,
        ..Selection::default()
    };
    let order = match args.sort {
        SortArg::Recent => SortBy::Recent,
        SortArg::Hits => SortBy::Hits,
        SortArg::Size => SortBy::Size,
    };
    let entries = match args.db.fleet()? {
        // Redis keeps no hit counts: newest first.
        Some(mut fleet) => fleet.list(&selection, args.limit)?,
        None => args.db.open()?.list(&selection, order, args.limit)?,
    };
    if args.json {
        return print_json(&entries);
    }
    println!("{}", entries_table(&entries));
    println!("{} entries", entries.len());
    Ok(())
}

pub(crate) fn show(args: &ShowArgs) -> Result<()> {
    let e = match args.db.fleet()? {
        Some(mut fleet) => fleet.show(&args.key)?,
        None => args.db.open()?.show(&args.key)?,
    };
    if args.json {
        return print_json(&e);
    }
    let answers = 1 + e.other_answers.len();
    let mut all: Vec<&ExportedEntry> = std::iter::once(&e).chain(&e.other_answers).collect();
    all.sort_by_key(|a| a.summary.slot);
    for (i, answer) in all.into_iter().enumerate() {
        if answers > 1 {
            let this = if answer.summary.key == e.summary.key {
                " (the key asked)"
            } else {
                ""
            };
            println!(
                "{}answer     {} of {answers} in its bucket{this}",
                if i > 0 { "\n" } else { "" },
                i + 1
            );
        }
        print_answer(answer)?;
    }
    Ok(())
}

/// One stored answer, for `show`.
fn print_answer(e: &ExportedEntry) -> Result<()> {
    let s = &e.summary;
    println!("key        {}", shown(&s.key));
    println!("route      {}", shown(&s.route));
    println!("model      {}", shown(s.model.as_deref().unwrap_or("-")));
    if !s.namespace.is_empty() {
        println!("namespace  {}", shown(&s.namespace));
    }
    println!("status     {}", e.status);
    println!("stored     {}", ago(s.created_at));
    println!("expires    {}", until(s.expires_at));
    println!(
        "hits       {}{}",
        s.hit_count,
        s.last_hit_at
            .map(|t| format!(" (last {})", ago(t)))
            .unwrap_or_default()
    );
    println!("size       {}", size(s.size));
    let n = |t: Option<u64>| t.map_or_else(|| "-".into(), |t| t.to_string());
    println!(
        "tokens     {} prompt, {} completion",
        n(e.prompt_tokens),
        n(e.completion_tokens)
    );
    for (k, v) in &e.headers {
        println!("header     {}: {}", shown(k), shown(v));
    }
    println!();
    match (&e.body, &e.body_hex) {
        (Some(text), _) => match serde_json::from_str::<serde_json::Value>(text) {
            Ok(json) => println!("{}", shown_lines(&serde_json::to_string_pretty(&json)?)),
            // A stream's events, or any text: shown as stored, control characters escaped.
            Err(_) => println!("{}", shown_lines(text)),
        },
        (None, Some(hex)) => println!("(binary body, {} bytes, hex)\n{hex}", hex.len() / 2),
        (None, None) => println!("(empty body)"),
    }
    Ok(())
}

pub(crate) fn purge(args: &PurgeArgs) -> Result<()> {
    let selection = Selection {
        model: args.model.clone(),
        older_than: args.older_than,
        key: args.key.clone(),
        expired: args.expired,
        ..Selection::default()
    };
    if let Some(mut fleet) = args.db.fleet()? {
        if args.all && !args.yes && std::io::stdin().is_terminal() {
            eprint!("Remove every entry of the fleet's shared tier? [y/N] ");
            std::io::stderr().flush()?;
            let mut answer = String::new();
            std::io::stdin().read_line(&mut answer)?;
            if !matches!(answer.trim(), "y" | "Y" | "yes") {
                bail!("nothing removed");
            }
        }
        let removed = fleet.purge(&selection, args.all)?;
        return purged(&removed, args.json);
    }
    let mut inspector = args.db.open()?;
    if args.all && !args.yes && std::io::stdin().is_terminal() {
        let n = inspector.entry_count()?;
        eprint!(
            "Remove all {n} entries from {}? [y/N] ",
            args.db.path()?.display()
        );
        std::io::stderr().flush()?;
        let mut answer = String::new();
        std::io::stdin().read_line(&mut answer)?;
        if !matches!(answer.trim(), "y" | "Y" | "yes") {
            bail!("nothing removed");
        }
    }
    let removed = inspector.purge(&selection)?;
    purged(&removed, args.json)
}

/// Reports what a purge removed.
fn purged(removed: &[EntrySummary], json: bool) -> Result<()> {
    if json {
        return print_json(&removed);
    }
    if !removed.is_empty() {
        println!("{}", entries_table(removed));
    }
    let bytes: u64 = removed.iter().map(|e| e.size).sum();
    println!("removed {} entries ({})", removed.len(), size(bytes));
    Ok(())
}

/// A progress bar on a terminal, nothing otherwise.
fn progress(len: Option<u64>) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    match len {
        Some(n) => ProgressBar::new(n).with_style(
            ProgressStyle::with_template("{bar:40} {pos}/{len} entries {eta}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        ),
        None => ProgressBar::new_spinner(),
    }
}

pub(crate) fn export(args: &ExportArgs) -> Result<()> {
    let inspector = args.db.open()?;
    let bar = progress(Some(inspector.entry_count()?));
    let mut out: Box<dyn Write> = match &args.output {
        Some(path) => Box::new(BufWriter::new(
            File::create(path).with_context(|| format!("cannot create {}", path.display()))?,
        )),
        None => Box::new(BufWriter::new(std::io::stdout().lock())),
    };
    let n = inspector.export(&mut out, &mut |n| bar.set_position(n))?;
    bar.finish_and_clear();
    eprintln!("exported {n} entries");
    Ok(())
}

pub(crate) fn import(args: &ImportArgs) -> Result<()> {
    let path = args.db.path()?;
    let mut inspector = llm_dedup::inspect::Inspector::create_or_open(&path)?;
    let mut input: Box<dyn BufRead> = match &args.input {
        Some(p) => Box::new(BufReader::new(
            File::open(p).with_context(|| format!("cannot open {}", p.display()))?,
        )),
        None => Box::new(BufReader::new(std::io::stdin().lock())),
    };
    let bar = progress(None);
    let report = inspector.import(&mut input, &mut |n| bar.set_position(n))?;
    bar.finish_and_clear();
    if args.json {
        return print_json(&report);
    }
    println!(
        "imported {} entries, skipped {} already present, {} rejected (out of range)",
        report.imported, report.skipped, report.rejected
    );
    if report.salt_mismatch {
        eprintln!(
            "warning: the export came from a database with another credential salt; entries \
             stored per API key will not be found here (entries stored with --shared-cache will)"
        );
    }
    Ok(())
}
