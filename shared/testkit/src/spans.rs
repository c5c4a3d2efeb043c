//! A `tracing` layer that captures spans and events in-process, for tests of what a service
//! traces:
//!
//! ```text
//! let capture = Capture::default();
//! let _guard = tracing::subscriber::set_default(tracing_subscriber::registry().with(capture.clone()));
//! // … run the service …
//! let scan = capture.one("registry.scan");
//! assert_eq!(scan.fields["models"], "3");
//! ```

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing_subscriber::layer::{Context, Layer};
use tracing_subscriber::registry::LookupSpan;

/// A span's or an event's fields, by name, as strings (`&str` values as they are, others as
/// `Debug` renders them).
pub type Fields = BTreeMap<String, String>;

/// A span as it was opened: its name, the names of its ancestors (nearest first) and its fields
/// (late ones included).
#[derive(Clone, Debug)]
pub struct Captured {
    pub name: &'static str,
    pub ancestors: Vec<&'static str>,
    pub fields: Fields,
    /// Closed (what an exporter sends); a span held somewhere stays open.
    pub closed: bool,
}

/// An event: its message, the name of the span it happened in, and its fields.
#[derive(Clone, Debug)]
pub struct Event {
    pub message: String,
    pub span: Option<&'static str>,
    pub fields: Fields,
}

/// The capturing layer; clones share what they captured.
#[derive(Clone, Default)]
pub struct Capture {
    /// Every span, in the order they were opened.
    pub spans: Arc<Mutex<Vec<Captured>>>,
    /// Every event, in the order they happened.
    pub events: Arc<Mutex<Vec<Event>>>,
}

/// A span's index in [`Capture::spans`], kept in the span's extensions.
struct Index(usize);

/// The field visitor: records every field into a [`Fields`].
pub struct Visitor<'a>(pub &'a mut Fields);

impl Visit for Visitor<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0
            .insert(field.name().to_string(), format!("{value:?}"));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_string(), value.to_string());
    }
}

impl<S: tracing::Subscriber + for<'a> LookupSpan<'a>> Layer<S> for Capture {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut fields = Fields::new();
        attrs.record(&mut Visitor(&mut fields));
        let ancestors = span.scope().skip(1).map(|s| s.name()).collect();
        let mut all = self.spans.lock().unwrap();
        all.push(Captured {
            name: span.name(),
            ancestors,
            fields,
            closed: false,
        });
        span.extensions_mut().insert(Index(all.len() - 1));
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let ext = span.extensions();
        let Some(Index(i)) = ext.get::<Index>() else {
            return;
        };
        let mut all = self.spans.lock().unwrap();
        values.record(&mut Visitor(&mut all[*i].fields));
    }

    fn on_close(&self, id: Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(&id) else { return };
        if let Some(Index(i)) = span.extensions().get::<Index>() {
            self.spans.lock().unwrap()[*i].closed = true;
        }
    }

    fn on_event(&self, event: &tracing::Event<'_>, ctx: Context<'_, S>) {
        let mut fields = Fields::new();
        event.record(&mut Visitor(&mut fields));
        let span = ctx.event_span(event).map(|s| s.name());
        self.events.lock().unwrap().push(Event {
            message: fields.get("message").cloned().unwrap_or_default(),
            span,
            fields,
        });
    }
}

impl Capture {
    /// Every span named `name` (open or closed), in the order they were opened.
    pub fn named(&self, name: &str) -> Vec<Captured> {
        self.spans
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.name == name)
            .cloned()
            .collect()
    }

    /// The one span named `name` (panics when there are none or several).
    pub fn one(&self, name: &str) -> Captured {
        let all = self.named(name);
        assert_eq!(all.len(), 1, "one {name} span: {all:?}");
        all.into_iter().next().unwrap()
    }

    /// Wait (10 s at most, else panic) until `n` closed spans named `name` satisfy `pred`, and
    /// return their fields, in the order the spans were opened.
    pub async fn wait(&self, name: &str, n: usize, pred: impl Fn(&Fields) -> bool) -> Vec<Fields> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let found: Vec<Fields> = self
                .spans
                .lock()
                .unwrap()
                .iter()
                .filter(|c| c.closed && c.name == name && pred(&c.fields))
                .map(|c| c.fields.clone())
                .collect();
            if found.len() >= n {
                return found;
            }
            if tokio::time::Instant::now() > deadline {
                let closed: Vec<Captured> = self
                    .spans
                    .lock()
                    .unwrap()
                    .iter()
                    .filter(|c| c.closed)
                    .cloned()
                    .collect();
                panic!("{n} closed {name} span(s) not seen; closed: {closed:#?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Field `k` of `f` (panics, showing every field, when there is none).
pub fn field<'a>(f: &'a Fields, k: &str) -> &'a str {
    f.get(k)
        .map(String::as_str)
        .unwrap_or_else(|| panic!("no {k} in {f:#?}"))
}
