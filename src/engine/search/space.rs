//! A search space: for some `TrainConfig` fields, the values a trial may take. Written as
//! text, one `field=domain` per item (items apart by spaces, commas or semicolons):
//!
//! ```text
//! lr=log_uniform(1e-4, 3e-3)  chunk_size=[4,8,16]  r=choice(1,2)  num_layers=int(2,6)
//! ```
//!
//! Domains: `[a,b,…]` or `choice(a,b,…)` (numbers or names), `uniform(lo, hi)`,
//! `log_uniform(lo, hi)` and `int(lo, hi)` (both ends included).

use std::fmt;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::fields::{kind_of, Kind};
use super::SpecError;
use crate::engine::data::mix64;

/// One value a field takes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Value {
    Int(i64),
    Float(f64),
    Word(String),
}

impl Value {
    fn parse(s: &str) -> Self {
        if let Ok(i) = s.parse::<i64>() {
            Self::Int(i)
        } else if let Ok(f) = s.parse::<f64>() {
            Self::Float(f)
        } else {
            Self::Word(s.to_string())
        }
    }

    /// The value as a number, when it is one.
    pub fn number(&self) -> Option<f64> {
        match self {
            Self::Int(i) => Some(*i as f64),
            Self::Float(f) => Some(*f),
            Self::Word(_) => None,
        }
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Int(i) => write!(f, "{i}"),
            Self::Float(x) => write!(f, "{x}"),
            Self::Word(w) => f.write_str(w),
        }
    }
}

/// Where a field's values come from.
#[derive(Clone, Debug, PartialEq)]
pub enum Domain {
    Choice(Vec<Value>),
    Uniform(f64, f64),
    LogUniform(f64, f64),
    /// Integers from the first to the second, both included.
    Int(i64, i64),
}

impl Domain {
    /// How many values a grid takes from it (None: continuous).
    fn size(&self) -> Option<u64> {
        match self {
            Self::Choice(v) => Some(v.len() as u64),
            Self::Int(lo, hi) => Some((hi - lo) as u64 + 1),
            Self::Uniform(..) | Self::LogUniform(..) => None,
        }
    }

    fn at(&self, i: u64) -> Value {
        match self {
            Self::Choice(v) => v[i as usize].clone(),
            Self::Int(lo, _) => Value::Int(lo + i as i64),
            _ => unreachable!("a grid over a continuous domain"),
        }
    }

    fn draw(&self, rng: &mut ChaCha8Rng) -> Value {
        match self {
            Self::Choice(v) => v[rng.random_range(0..v.len())].clone(),
            Self::Int(lo, hi) => Value::Int(rng.random_range(*lo..=*hi)),
            Self::Uniform(lo, hi) => Value::Float(lo + rng.random::<f64>() * (hi - lo)),
            Self::LogUniform(lo, hi) => {
                let (a, b) = (lo.ln(), hi.ln());
                Value::Float((a + rng.random::<f64>() * (b - a)).exp())
            }
        }
    }

    /// The values whose check stands for the whole domain: every choice, or both ends.
    pub fn corners(&self) -> Vec<Value> {
        match self {
            Self::Choice(v) => v.clone(),
            Self::Int(lo, hi) => vec![Value::Int(*lo), Value::Int(*hi)],
            Self::Uniform(lo, hi) | Self::LogUniform(lo, hi) => {
                vec![Value::Float(*lo), Value::Float(*hi)]
            }
        }
    }
}

impl fmt::Display for Domain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Choice(v) => {
                let v: Vec<String> = v.iter().map(Value::to_string).collect();
                write!(f, "[{}]", v.join(","))
            }
            Self::Uniform(lo, hi) => write!(f, "uniform({lo},{hi})"),
            Self::LogUniform(lo, hi) => write!(f, "log_uniform({lo},{hi})"),
            Self::Int(lo, hi) => write!(f, "int({lo},{hi})"),
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Param {
    pub field: String,
    pub domain: Domain,
}

/// The fields a search sets and where each one's values come from, in the order written.
#[derive(Clone, Debug, PartialEq, Default, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Space {
    pub params: Vec<Param>,
}

/// A trial's values, field by field.
pub type Assignment = Vec<(String, Value)>;

/// `field=value` items for people: drawn numbers to 5 significant digits.
pub fn describe(values: &Assignment) -> String {
    let items: Vec<String> = values
        .iter()
        .map(|(f, v)| match v {
            Value::Float(x) => {
                let rounded: f64 = format!("{x:.4e}").parse().unwrap_or(*x);
                format!("{f}={rounded}")
            }
            v => format!("{f}={v}"),
        })
        .collect();
    items.join(" ")
}

/// Most points a space without replacement draws from (a permutation of them is kept).
const SHUFFLE_MAX: u64 = 1 << 16;

impl Space {
    /// Parses and checks the text form; errors name the field (`space.lr`).
    pub fn parse(text: &str) -> Result<Self, SpecError> {
        let mut params: Vec<Param> = Vec::new();
        for item in items(&normalise(text)) {
            let (field, domain) = item
                .split_once('=')
                .ok_or_else(|| SpecError::new("space", format!("'{item}' is not field=domain")))?;
            let at = format!("space.{field}");
            let kind = kind_of(field).ok_or_else(|| {
                SpecError::new(
                    &at,
                    format!(
                        "not a searchable field (searchable: {})",
                        super::fields::names().join(", ")
                    ),
                )
            })?;
            if params.iter().any(|p| p.field == field) {
                return Err(SpecError::new(&at, "given twice"));
            }
            let domain = parse_domain(domain).map_err(|m| SpecError::new(&at, m))?;
            check(&domain, kind).map_err(|m| SpecError::new(&at, m))?;
            params.push(Param {
                field: field.to_string(),
                domain,
            });
        }
        if params.is_empty() {
            return Err(SpecError::new(
                "space",
                "is empty: give at least one field=domain, e.g. lr=log_uniform(1e-4,3e-3)",
            ));
        }
        Ok(Self { params })
    }

    /// Points in the grid over every field (None: a field is continuous); saturates.
    pub fn grid_size(&self) -> Option<u64> {
        self.params
            .iter()
            .try_fold(1u64, |n, p| Some(n.saturating_mul(p.domain.size()?)))
    }

    /// The grid's point `index` (the first field changes slowest).
    pub fn grid_point(&self, mut index: u64) -> Assignment {
        let mut point: Assignment = Vec::with_capacity(self.params.len());
        for p in self.params.iter().rev() {
            let n = p.domain.size().expect("a grid over discrete fields");
            point.push((p.field.clone(), p.domain.at(index % n)));
            index /= n;
        }
        point.reverse();
        point
    }

    /// Trial `trial`'s values, drawn from `seed`: independent draws per field; a discrete
    /// space of at most 65,536 points is drawn without replacement (a seeded permutation
    /// of its grid), so no two of its trials are the same.
    pub fn sample(&self, seed: u64, trial: u32) -> Assignment {
        if let Some(n) = self.grid_size().filter(|&n| n <= SHUFFLE_MAX) {
            let mut order: Vec<u64> = (0..n).collect();
            let mut rng = ChaCha8Rng::seed_from_u64(mix64(seed));
            for i in (1..order.len()).rev() {
                order.swap(i, rng.random_range(0..=i));
            }
            return self.grid_point(order[trial as usize % order.len()]);
        }
        let mut rng = ChaCha8Rng::seed_from_u64(mix64(seed ^ mix64(u64::from(trial) + 1)));
        self.params
            .iter()
            .map(|p| (p.field.clone(), p.domain.draw(&mut rng)))
            .collect()
    }
}

impl fmt::Display for Space {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let items: Vec<String> = self
            .params
            .iter()
            .map(|p| format!("{}={}", p.field, p.domain))
            .collect();
        f.write_str(&items.join(" "))
    }
}

impl TryFrom<String> for Space {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        Self::parse(&s).map_err(|e| e.to_string())
    }
}

impl From<Space> for String {
    fn from(s: Space) -> String {
        s.to_string()
    }
}

/// The text without the spaces a person puts around `=`, brackets and commas.
fn normalise(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    for (i, &c) in chars.iter().enumerate() {
        if c.is_whitespace() {
            let prev = chars[..i].iter().rev().find(|c| !c.is_whitespace());
            let next = chars[i + 1..].iter().find(|c| !c.is_whitespace());
            let glued = prev.is_some_and(|p| "=([,".contains(*p))
                || next.is_some_and(|n| "=()],".contains(*n));
            if glued {
                continue;
            }
        }
        out.push(c);
    }
    out
}

/// The top-level items: apart by whitespace, commas or semicolons outside brackets.
fn items(text: &str) -> Vec<String> {
    let (mut out, mut cur, mut depth) = (Vec::new(), String::new(), 0i32);
    for c in text.chars() {
        match c {
            '(' | '[' => depth += 1,
            ')' | ']' => depth -= 1,
            _ => {}
        }
        if depth == 0 && (c.is_whitespace() || c == ',' || c == ';') {
            if !cur.is_empty() {
                out.push(std::mem::take(&mut cur));
            }
        } else {
            cur.push(c);
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

fn parse_domain(text: &str) -> Result<Domain, String> {
    let usage = "expected [a,b,…], choice(a,b,…), uniform(lo,hi), log_uniform(lo,hi) or int(lo,hi)";
    let (name, inner) = if let Some(list) = text.strip_prefix('[') {
        (
            "choice",
            list.strip_suffix(']')
                .ok_or(format!("'{text}': unclosed ["))?,
        )
    } else {
        let open = text.find(['(', '[']).ok_or(format!("'{text}': {usage}"))?;
        let close = if &text[open..=open] == "(" { ')' } else { ']' };
        let inner = text[open + 1..]
            .strip_suffix(close)
            .ok_or(format!("'{text}': unclosed {}", &text[open..=open]))?;
        (&text[..open], inner)
    };
    let args: Vec<&str> = inner.split(',').filter(|s| !s.is_empty()).collect();
    let number = |s: &str| {
        s.parse::<f64>()
            .ok()
            .filter(|x| x.is_finite())
            .ok_or(format!("'{s}' is not a finite number"))
    };
    let pair = |what: &str| -> Result<(f64, f64), String> {
        let [lo, hi] = args[..] else {
            return Err(format!("{what} takes two numbers, lo and hi: '{text}'"));
        };
        let (lo, hi) = (number(lo)?, number(hi)?);
        if lo >= hi {
            return Err(format!("{what}({lo}, {hi}): lo must be below hi"));
        }
        Ok((lo, hi))
    };
    match name {
        "choice" => {
            if args.is_empty() {
                return Err("an empty choice: give at least one value".into());
            }
            let values: Vec<Value> = args.iter().map(|a| Value::parse(a)).collect();
            if let Some(dup) = values
                .iter()
                .enumerate()
                .find(|(i, v)| values[..*i].contains(v))
            {
                return Err(format!("{} is in the choice twice", dup.1));
            }
            Ok(Domain::Choice(values))
        }
        "uniform" => pair("uniform").map(|(lo, hi)| Domain::Uniform(lo, hi)),
        "log_uniform" => {
            let (lo, hi) = pair("log_uniform")?;
            if lo <= 0.0 {
                return Err(format!(
                    "log_uniform({lo}, {hi}): the logarithm needs lo > 0"
                ));
            }
            Ok(Domain::LogUniform(lo, hi))
        }
        "int" => {
            let [lo, hi] = args[..] else {
                return Err(format!("int takes two integers, lo and hi: '{text}'"));
            };
            let int = |s: &str| {
                s.parse::<i64>()
                    .map_err(|_| format!("'{s}' is not an integer"))
            };
            let (lo, hi) = (int(lo)?, int(hi)?);
            if lo >= hi {
                return Err(format!("int({lo}, {hi}): lo must be below hi"));
            }
            Ok(Domain::Int(lo, hi))
        }
        other => Err(format!("unknown domain '{other}': {usage}")),
    }
}

/// Whether the domain's values suit the field's kind.
fn check(domain: &Domain, kind: Kind) -> Result<(), String> {
    match (kind, domain) {
        (Kind::Word(names), Domain::Choice(values)) => {
            for v in values {
                if !matches!(v, Value::Word(w) if names.contains(&w.as_str())) {
                    return Err(format!("{v} is not one of {}", names.join(", ")));
                }
            }
            Ok(())
        }
        (Kind::Word(names), _) => Err(format!(
            "takes a choice of names ({}), not a range",
            names.join(", ")
        )),
        (Kind::Int, Domain::Uniform(..) | Domain::LogUniform(..)) => {
            Err("is an integer: give int(lo, hi) or a choice, not a continuous range".into())
        }
        (Kind::Int, Domain::Choice(values)) => {
            match values.iter().find(|v| !matches!(v, Value::Int(_))) {
                Some(v) => Err(format!("{v} is not an integer")),
                None => Ok(()),
            }
        }
        (Kind::Float, Domain::Choice(values)) => match values.iter().find(|v| v.number().is_none())
        {
            Some(v) => Err(format!("{v} is not a number")),
            None => Ok(()),
        },
        _ => Ok(()),
    }
}
