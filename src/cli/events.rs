//! How `voucher-operator events` prints: the last events of a query as a
//! table whose columns fit them (or JSON lines), then, with `--follow`, each
//! new one as it arrives.

use std::collections::VecDeque;
use std::io::Write;

use serde_json::Value;

use crate::events::EventSink;

/// Widest ACTOR column; longer actors are shortened with "…".
const ACTOR_WIDTH: usize = 40;

/// The event subject `--code` asks for: a code, or `campaign:<namespace>/<name>` for a
/// campaign's own records (whose subject is `CAMPAIGN:<NAMESPACE>/<NAME>`).
pub(super) fn subject_of(wanted: &str) -> Result<String, String> {
    let trimmed = wanted.trim();
    let campaign = trimmed
        .get(..9)
        .filter(|p| p.eq_ignore_ascii_case("campaign:"))
        .map(|_| &trimmed[9..]);
    let Some(campaign) = campaign else {
        return crate::domain::Code::parse(wanted)
            .map(|c| c.to_string())
            .map_err(|e| e.to_string());
    };
    // Both parts are DNS labels: nothing a subject filter would read as a wildcard.
    let label = |part: &str| {
        !part.is_empty()
            && part.len() <= 63
            && part.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
    };
    match campaign.split_once('/') {
        Some((namespace, name)) if label(namespace) && label(name) => {
            Ok(crate::domain::campaign::subject(namespace, name))
        }
        _ => Err(format!(
            "{wanted:?} is not campaign:<namespace>/<name>, e.g. campaign:billing/bill-2027"
        )),
    }
}

/// One event as a row: time, code, type, actor, reason.
struct EventRow([String; 5]);

pub(super) struct EventTable<W: Write> {
    out: W,
    json: bool,
    utc: bool,
    /// Events kept until caught up: the last `tail`.
    tail: usize,
    kept: VecDeque<Value>,
    /// Column widths, set when the kept events are printed.
    widths: Option<[usize; 4]>,
    /// Events printed.
    pub printed: usize,
}

impl<W: Write> EventTable<W> {
    pub fn new(out: W, json: bool, utc: bool, tail: usize) -> Self {
        Self {
            out,
            json,
            utc,
            tail,
            kept: VecDeque::new(),
            widths: None,
            printed: 0,
        }
    }

    fn row(&self, event: &Value) -> EventRow {
        let text = |v: &Value| v.as_str().unwrap_or("").to_owned();
        let kind = text(&event["type"])
            .trim_start_matches(crate::domain::audit::EVENT_TYPE_PREFIX)
            .trim_start_matches('.')
            .trim_end_matches(".v1")
            .to_owned();
        let actor = &event["data"]["actor"];
        let actor = match actor["type"].as_str() {
            Some("resource") => format!("{}/{}", text(&actor["namespace"]), text(&actor["name"])),
            // As `--code campaign:<namespace>/<name>` asks for its own records.
            Some("campaign") => format!(
                "campaign:{}/{}",
                text(&actor["namespace"]),
                text(&actor["name"])
            ),
            Some("subject") => format!("sub:{}", text(&actor["subject"])),
            _ => String::new(),
        };
        EventRow([
            self.time(&text(&event["time"])),
            text(&event["subject"]),
            kind,
            actor,
            text(&event["data"]["reason"]),
        ])
    }

    /// RFC 3339 to the second, with the zone: local time, or UTC (`Z`).
    fn time(&self, time: &str) -> String {
        match chrono::DateTime::parse_from_rfc3339(time) {
            Ok(at) if self.utc => at
                .with_timezone(&chrono::Utc)
                .format("%Y-%m-%dT%H:%M:%SZ")
                .to_string(),
            Ok(at) => at
                .with_timezone(&chrono::Local)
                .format("%Y-%m-%dT%H:%M:%S%:z")
                .to_string(),
            Err(_) => time.to_owned(),
        }
    }

    fn print_row(&mut self, row: &EventRow, widths: [usize; 4]) -> std::io::Result<()> {
        let [time, code, kind, actor, reason] = &row.0;
        let actor = shorten(actor, widths[3]);
        writeln!(
            self.out,
            "{time:<w0$} {code:<w1$} {kind:<w2$} {actor:<w3$} {reason}",
            w0 = widths[0],
            w1 = widths[1],
            w2 = widths[2],
            w3 = widths[3],
        )
    }

    fn print(&mut self, event: &Value) -> std::io::Result<()> {
        self.printed += 1;
        if self.json {
            return writeln!(self.out, "{event}");
        }
        let row = self.row(event);
        let mut widths = self.widths.expect("set when caught up");
        // A code or an actor longer than its column widens it (an actor up to ACTOR_WIDTH),
        // under a new header: codes stay whole (they are what a person looks for) and every
        // column still starts where its header does.
        let code = row.0[1].chars().count();
        let actor = row.0[3].chars().count().min(ACTOR_WIDTH);
        if code > widths[1] || actor > widths[3] {
            widths[1] = widths[1].max(code);
            widths[3] = widths[3].max(actor);
            self.widths = Some(widths);
            self.print_row(&header(), widths)?;
        }
        self.print_row(&row, widths)
    }
}

fn header() -> EventRow {
    EventRow(["TIME", "CODE", "TYPE", "ACTOR", "REASON"].map(String::from))
}

/// The CODE column at least: a campaign's codes (prefix and 10 characters) fit.
const CODE_WIDTH: usize = 26;

/// The TYPE column: the longest type there is, so that every later one fits.
fn type_width() -> usize {
    crate::domain::AuditKind::ALL
        .iter()
        .map(|kind| kind.as_str().len())
        .max()
        .unwrap_or_default()
}

fn shorten(text: &str, width: usize) -> String {
    if text.chars().count() <= width {
        return text.to_owned();
    }
    let kept: String = text.chars().take(width.saturating_sub(1)).collect();
    format!("{kept}…")
}

impl<W: Write> EventTable<W> {
    /// Columns fixed before any event is seen: wide enough for times, the
    /// usual codes and every type; the actor shortened as always.
    fn streaming_widths(&self) -> [usize; 4] {
        let time = if self.utc { 20 } else { 25 };
        [time, CODE_WIDTH, type_width(), ACTOR_WIDTH]
    }
}

impl<W: Write> EventSink for EventTable<W> {
    fn event(&mut self, event: &Value) -> std::io::Result<()> {
        // `--tail all` keeps nothing back: every event is printed as it
        // comes, in columns fixed up front (holding a whole stream in memory
        // to measure it would grow without bound).
        if self.widths.is_none() && self.tail == usize::MAX {
            let widths = self.streaming_widths();
            self.widths = Some(widths);
            if !self.json {
                self.print_row(&header(), widths)?;
            }
        }
        if self.widths.is_some() {
            self.print(event)?;
            return self.out.flush();
        }
        self.kept.push_back(event.clone());
        if self.kept.len() > self.tail {
            self.kept.pop_front();
        }
        Ok(())
    }

    fn caught_up(&mut self) -> std::io::Result<()> {
        if self.widths.is_some() {
            return Ok(());
        }
        let rows: Vec<EventRow> = self.kept.iter().map(|e| self.row(e)).collect();
        let header = header();
        let mut widths = [0; 4];
        for row in std::iter::once(&header).chain(&rows) {
            for (width, cell) in widths.iter_mut().zip(&row.0) {
                *width = (*width).max(cell.chars().count());
            }
        }
        widths[3] = widths[3].min(ACTOR_WIDTH);
        // New events later may bring longer codes and types: room for them.
        widths[1] = widths[1].max(CODE_WIDTH);
        widths[2] = widths[2].max(type_width());
        self.widths = Some(widths);
        if !self.json && !rows.is_empty() {
            self.print_row(&header, widths)?;
        }
        for event in std::mem::take(&mut self.kept) {
            self.print(&event)?;
        }
        self.out.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn event(code: &str, actor: &str) -> Value {
        json!({"time": "2026-11-27T20:27:17.123456Z", "subject": code,
               "type": "io.openova.catalyst.voucher.redeemed.v1",
               "data": {"actor": {"type": "subject", "subject": actor}, "reason": "redeemed"}})
    }

    #[test]
    fn the_last_events_print_in_columns_that_hold_with_the_time_zone() {
        let mut out = Vec::new();
        let mut table = EventTable::new(&mut out, false, true, 2);
        for (code, actor) in [
            ("OLD-1", "a"),
            ("A-VERY-LONG-CODE-OF-CAMPAIGN-2026", "b"),
            ("C-1", &"x".repeat(80)),
        ] {
            table.event(&event(code, actor)).unwrap();
        }
        table.caught_up().unwrap();
        table.event(&event("LIVE-1", "c")).unwrap();
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "header, the last two, one live: {text}");
        assert!(lines[0].starts_with("TIME"));
        assert!(!text.contains("OLD-1"), "only the tail");
        assert!(
            lines[1].starts_with("2026-11-27T20:27:17Z "),
            "{}",
            lines[1]
        );
        // Every column starts where the header's does, the live row's too (in characters:
        // the shortened actor ends with a multi-byte "…").
        let column = |line: &str, byte: usize| line[..byte].chars().count();
        for line in &lines[1..] {
            assert_eq!(lines[0].find("TYPE"), line.find("redeemed"), "{line}");
            assert_eq!(
                column(lines[0], lines[0].find("REASON").unwrap()),
                column(line, line.rfind("redeemed").unwrap()),
                "{line}"
            );
        }
        assert!(
            lines[2].contains('…'),
            "a long actor is shortened: {}",
            lines[2]
        );
    }

    /// `--follow` fixes its columns from the first batch; what comes later (the longest type,
    /// a longer code) still lands under its header.
    #[test]
    fn later_events_of_any_width_stay_in_their_columns() {
        let mut out = Vec::new();
        let mut table = EventTable::new(&mut out, false, true, 10);
        table.event(&event("C-1", "a")).unwrap();
        table.caught_up().unwrap();
        let mut longest = event("C-2", "b");
        longest["type"] = json!("io.openova.catalyst.voucher.campaign_suspension_lifted.v1");
        table.event(&longest).unwrap();
        let long_code = "A-VERY-LONG-CODE-OF-A-PARTNER-CAMPAIGN-2027-0001";
        table.event(&event(long_code, "local-developer")).unwrap();
        table.event(&event("C-3", "d")).unwrap();
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines.len(),
            6,
            "a header again when the code column widens: {text}"
        );
        assert!(lines[4].contains(long_code), "codes stay whole: {text}");
        assert!(
            lines[4].contains("sub:local-developer "),
            "an actor too: {text}"
        );
        for (header, rows) in [(lines[0], &lines[1..3]), (lines[3], &lines[4..6])] {
            assert!(header.starts_with("TIME"), "{text}");
            for row in rows {
                assert_eq!(
                    header.find("ACTOR"),
                    row.find(" sub:").map(|i| i + 1),
                    "{text}"
                );
            }
        }
    }

    #[test]
    fn every_kind_of_actor_is_named() {
        let mut out = Vec::new();
        let mut table = EventTable::new(&mut out, false, true, 10);
        for actor in [
            json!({"type": "resource", "namespace": "billing", "name": "launch", "uid": "u"}),
            json!({"type": "campaign", "namespace": "billing", "name": "bill-2027", "uid": "u"}),
            json!({"type": "subject", "subject": "alice"}),
        ] {
            let mut e = event("C-1", "x");
            e["data"]["actor"] = actor;
            table.event(&e).unwrap();
        }
        table.caught_up().unwrap();
        let text = String::from_utf8(out).unwrap();
        for name in ["billing/launch", "campaign:billing/bill-2027", "sub:alice"] {
            assert!(text.contains(name), "{name} missing:\n{text}");
        }
    }

    #[test]
    fn a_campaign_is_asked_for_by_namespace_and_name() {
        assert_eq!(
            subject_of("campaign:billing/bill-2027").unwrap(),
            "CAMPAIGN:BILLING/BILL-2027"
        );
        assert_eq!(
            subject_of(" Campaign:billing/bill-2027 ").unwrap(),
            "CAMPAIGN:BILLING/BILL-2027"
        );
        assert_eq!(subject_of(" launch-50 ").unwrap(), "LAUNCH-50");
        for wrong in [
            "campaign:billing",
            "campaign:billing/*",
            "campaign:/x",
            "campaign:a/b.c",
        ] {
            assert!(
                subject_of(wrong)
                    .unwrap_err()
                    .contains("campaign:<namespace>/<name>"),
                "{wrong}"
            );
        }
        assert!(subject_of("a b").is_err());
    }

    #[test]
    fn tail_all_prints_each_event_as_it_comes_and_keeps_none() {
        let mut table = EventTable::new(Vec::new(), false, true, usize::MAX);
        table.event(&event("FIRST-1", "a")).unwrap();
        // Printed before the stream is caught up, and nothing held back.
        assert!(table.kept.is_empty());
        let text = String::from_utf8(table.out.clone()).unwrap();
        assert!(text.starts_with("TIME"), "{text}");
        assert!(text.contains("FIRST-1"), "{text}");
        table.event(&event("SECOND-2", "b")).unwrap();
        table.caught_up().unwrap();
        assert!(table.kept.is_empty());
        let text = String::from_utf8(table.out).unwrap();
        assert_eq!(
            text.lines().count(),
            3,
            "the header once, then both: {text}"
        );
        assert_eq!(table.printed, 2);
    }
}
