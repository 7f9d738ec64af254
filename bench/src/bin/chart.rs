//! `chart OUT.svg TITLE X_LABEL Y_LABEL [logx] [logy] < CSV`: the curves of `make bench`, drawn
//! as a small SVG line chart. CSV lines are `series,x,y` (no header); each series is one line,
//! its points in the order given. Axes start at zero unless logarithmic; ticks are 1-2-5 steps
//! (linear) or powers of ten and their 2 and 5 multiples (log).

use anyhow::{bail, Context, Result};
use std::fmt::Write as _;
use std::io::Read;

const WIDTH: f64 = 720.0;
const HEIGHT: f64 = 420.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 190.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 60.0;
const COLOURS: [&str; 8] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
];

/// One axis: its range and scale.
struct Axis {
    lo: f64,
    hi: f64,
    log: bool,
}

impl Axis {
    fn new(values: impl Iterator<Item = f64> + Clone, log: bool) -> Axis {
        let min = values.clone().fold(f64::INFINITY, f64::min);
        let max = values.fold(f64::NEG_INFINITY, f64::max);
        if log {
            // the nearest 1-2-5 values around the data, so that a curve from 987 to 11k does not
            // sit in the middle of four decades
            let decade = |v: f64| 10f64.powf(v.log10().floor());
            let lo = [5.0, 2.0, 1.0]
                .into_iter()
                .map(|m| m * decade(min))
                .find(|t| *t <= min * 1.0001)
                .unwrap_or(decade(min));
            let hi = [1.0, 2.0, 5.0, 10.0]
                .into_iter()
                .map(|m| m * decade(max))
                .find(|t| *t >= max * 0.9999 && *t > lo)
                .unwrap_or(10.0 * decade(max));
            Axis { lo, hi, log }
        } else {
            let step = nice_step(max.max(f64::MIN_POSITIVE) / 5.0);
            let hi = (max / step).ceil().max(1.0) * step;
            Axis { lo: 0.0, hi, log }
        }
    }

    /// Where `v` falls, from 0 (low end) to 1 (high end).
    fn fraction(&self, v: f64) -> f64 {
        if self.log {
            (v.log10() - self.lo.log10()) / (self.hi.log10() - self.lo.log10())
        } else {
            (v - self.lo) / (self.hi - self.lo)
        }
    }

    fn ticks(&self) -> Vec<f64> {
        if self.log {
            let decades = (self.hi / self.lo).log10();
            let multiples: &[f64] = if decades <= 2.5 {
                &[1.0, 2.0, 5.0]
            } else {
                &[1.0]
            };
            let mut ticks = Vec::new();
            let mut decade = 10f64.powf(self.lo.log10().floor());
            while decade <= self.hi * 1.0001 {
                for m in multiples {
                    let t = decade * m;
                    if t >= self.lo * 0.9999 && t <= self.hi * 1.0001 {
                        ticks.push(t);
                    }
                }
                decade *= 10.0;
            }
            ticks
        } else {
            let step = nice_step(self.hi / 5.0);
            (0..)
                .map(|i| f64::from(i) * step)
                .take_while(|t| *t <= self.hi * 1.0001)
                .collect()
        }
    }
}

/// The 1-2-5 step at or above `raw`.
fn nice_step(raw: f64) -> f64 {
    let magnitude = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * magnitude)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * magnitude)
}

/// A tick label: 1500 -> "1.5k", 64000 -> "64k", 0.5 -> "0.5".
fn label(v: f64) -> String {
    let (v, unit) = match v.abs() {
        a if a >= 1e6 => (v / 1e6, "M"),
        a if a >= 1e3 => (v / 1e3, "k"),
        _ => (v, ""),
    };
    let digits = format!("{v:.2}");
    let digits = digits.trim_end_matches('0').trim_end_matches('.');
    format!("{digits}{unit}")
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 5 {
        bail!("usage: chart OUT.svg TITLE X_LABEL Y_LABEL [logx] [logy] < CSV (series,x,y)");
    }
    let (out, title, x_label, y_label) = (&args[1], &args[2], &args[3], &args[4]);
    let flags = &args[5..];
    let mut input = String::new();
    std::io::stdin().read_to_string(&mut input)?;
    let mut series: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
    for line in input.lines().filter(|l| !l.trim().is_empty()) {
        let mut fields = line.rsplitn(3, ',');
        let (Some(y), Some(x), Some(name)) = (fields.next(), fields.next(), fields.next()) else {
            bail!("not series,x,y: {line:?}");
        };
        let x: f64 = x.trim().parse().with_context(|| format!("x in {line:?}"))?;
        let y: f64 = y.trim().parse().with_context(|| format!("y in {line:?}"))?;
        if !x.is_finite() || !y.is_finite() {
            continue;
        }
        match series.iter_mut().find(|(n, _)| n == name) {
            Some((_, points)) => points.push((x, y)),
            None => series.push((name.to_string(), vec![(x, y)])),
        }
    }
    if series.is_empty() {
        bail!("no points");
    }
    let points = || series.iter().flat_map(|(_, p)| p.iter().copied());
    let x_axis = Axis::new(points().map(|p| p.0), flags.iter().any(|f| f == "logx"));
    let y_axis = Axis::new(points().map(|p| p.1), flags.iter().any(|f| f == "logy"));
    let plot_w = WIDTH - LEFT - RIGHT;
    let plot_h = HEIGHT - TOP - BOTTOM;
    let px = |x: f64| LEFT + x_axis.fraction(x) * plot_w;
    let py = |y: f64| TOP + (1.0 - y_axis.fraction(y)) * plot_h;

    let mut svg = String::new();
    writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">"#
    )?;
    writeln!(
        svg,
        r#"<rect width="100%" height="100%" fill="white"/><text x="{}" y="22" text-anchor="middle" font-size="15">{}</text>"#,
        LEFT + plot_w / 2.0,
        escape(title)
    )?;
    for t in x_axis.ticks() {
        let x = px(t);
        writeln!(
            svg,
            r##"<line x1="{x:.1}" y1="{TOP}" x2="{x:.1}" y2="{:.1}" stroke="#e0e0e0"/><text x="{x:.1}" y="{:.1}" text-anchor="middle">{}</text>"##,
            TOP + plot_h,
            TOP + plot_h + 16.0,
            label(t)
        )?;
    }
    for t in y_axis.ticks() {
        let y = py(t);
        writeln!(
            svg,
            r##"<line x1="{LEFT}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#e0e0e0"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
            LEFT + plot_w,
            LEFT - 6.0,
            y + 4.0,
            label(t)
        )?;
    }
    writeln!(
        svg,
        r#"<rect x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" fill="none" stroke="black"/>"#
    )?;
    writeln!(
        svg,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
        LEFT + plot_w / 2.0,
        HEIGHT - 20.0,
        escape(x_label)
    )?;
    writeln!(
        svg,
        r#"<text transform="translate(18 {:.1}) rotate(-90)" text-anchor="middle">{}</text>"#,
        TOP + plot_h / 2.0,
        escape(y_label)
    )?;
    for (i, (name, points)) in series.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let path: Vec<String> = points
            .iter()
            .map(|(x, y)| format!("{:.1},{:.1}", px(*x), py(*y)))
            .collect();
        writeln!(
            svg,
            r#"<polyline points="{}" fill="none" stroke="{colour}" stroke-width="2"/>"#,
            path.join(" ")
        )?;
        for (x, y) in points {
            writeln!(
                svg,
                r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{colour}"/>"#,
                px(*x),
                py(*y)
            )?;
        }
        let ly = TOP + 10.0 + 20.0 * i as f64;
        let lx = LEFT + plot_w + 12.0;
        writeln!(
            svg,
            r#"<line x1="{lx}" y1="{ly}" x2="{}" y2="{ly}" stroke="{colour}" stroke-width="2"/><text x="{}" y="{}">{}</text>"#,
            lx + 20.0,
            lx + 26.0,
            ly + 4.0,
            escape(name)
        )?;
    }
    svg.push_str("</svg>\n");
    std::fs::write(out, svg).with_context(|| format!("writing {out}"))?;
    Ok(())
}
