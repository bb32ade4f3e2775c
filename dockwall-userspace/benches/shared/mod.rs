//! What both benchmarks share.

/// The machine a result was measured on: kernel, cores, CPU model.
pub fn machine() -> String {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("model name\t: ").map(str::to_string))
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("Linux {}, {cores} cores, {cpu}", kernel.trim())
}

/// Where a plot is drawn: the SVG's size and the plot area's margins.
pub struct Frame {
    pub w: f64,
    pub h: f64,
    pub left: f64,
    pub bottom: f64,
    pub top: f64,
    pub right: f64,
}

impl Frame {
    /// The SVG header, a title, both axes, and the x axis's labels: one per
    /// decade from 10 to `max_n` at `x(n)`, named `x_name`.
    pub fn open(&self, title: &str, max_n: f64, x: impl Fn(usize) -> f64, x_name: &str) -> String {
        use std::fmt::Write as _;
        let Frame {
            w,
            h,
            left,
            bottom,
            top,
            right,
        } = *self;
        let mut s = format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
             <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
             <text x=\"{left}\" y=\"18\" font-size=\"14\">{title}</text>\n\
             <line x1=\"{left}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/>\n<line x1=\"{left}\" y1=\"{top}\" x2=\"{left}\" y2=\"{}\" stroke=\"black\"/>\n",
            h - bottom,
            w - right,
            h - bottom,
            h - bottom
        );
        let mut n = 10usize;
        while n as f64 <= max_n {
            let _ = writeln!(
                s,
                "<text x=\"{:.0}\" y=\"{}\" text-anchor=\"middle\">{n}</text>",
                x(n),
                h - bottom + 18.0
            );
            n *= 10;
        }
        let _ = writeln!(
            s,
            "<text x=\"{:.0}\" y=\"{}\" text-anchor=\"middle\">{x_name}</text>",
            (left + w - right) / 2.0,
            h - 10.0
        );
        s
    }
}
