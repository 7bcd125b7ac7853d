//! Robust online baselines: EWMA of the value and of its absolute deviation (a streaming
//! stand-in for median/MAD), with hour-of-week seasonality for activity once a week of
//! history exists, a presence rate for rare features, and a one-sided CUSUM on the log
//! scale against a slow reference for drift.

use serde::{Deserialize, Serialize};

use crate::features::{CONDITIONAL, COUNT, FLOORS, N, RARE, RELATIVE};

/// Tuning for the baselines; see `docs/detection.md`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BaselineConfig {
    /// Weight of a new window in the mean and deviation EWMAs.
    pub alpha: f32,
    /// Weight of a new window in the slow reference the drift test compares against.
    pub drift_alpha: f32,
    /// CUSUM allowance, in reference deviations: shifts smaller than this are ignored.
    pub drift_delta: f32,
    /// CUSUM threshold, in accumulated deviations.
    pub drift_lambda: f32,
    /// A value is clipped to `expected ± clip × spread` before it updates the baseline,
    /// so one attack window does not teach the baseline that attacks are normal.
    pub clip: f32,
}

impl Default for BaselineConfig {
    fn default() -> Self {
        Self {
            alpha: 0.05,
            drift_alpha: 0.002,
            drift_delta: 0.5,
            drift_lambda: 40.0,
            clip: 4.0,
        }
    }
}

/// Windows a baseline learns before its drift test runs.
pub const DRIFT_WARMUP: u32 = 240;
/// Weight of a window in a feature's presence rate (share of windows holding it).
pub const PRESENCE_ALPHA: f32 = 0.01;
/// Hours of history before the hour-of-week profile scales expectations (a week: every
/// hour of the week seen once).
pub const SEASON_HOURS: f32 = 168.0;
/// Hours of history before an hour of the week can be called unusual (two weeks).
pub const UNUSUAL_HOURS: f32 = 336.0;

/// What the drift test watches, on the log scale: volume per window and per event.
pub const DRIFT_FEATURES: [&str; 6] = [
    "events",
    "distinct_targets",
    "bytes_out",
    "tokens",
    "bytes_per_event",
    "young_destination_share",
];

/// One feature's statistics.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(from = "[f32; 3]", into = "[f32; 3]")]
pub struct Stat {
    pub mean: f32,
    pub dev: f32,
    /// Share of recent windows in which the feature was non-zero (EWMA).
    pub presence: f32,
}

impl From<[f32; 3]> for Stat {
    fn from([mean, dev, presence]: [f32; 3]) -> Self {
        Self { mean, dev, presence }
    }
}

impl From<Stat> for [f32; 3] {
    fn from(stat: Stat) -> Self {
        [stat.mean, stat.dev, stat.presence]
    }
}

/// The drift test's state for one of [`DRIFT_FEATURES`]: a slow reference level and
/// deviation of ln(1 + value), and the one-sided CUSUM of standardised excess.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(from = "[f32; 4]", into = "[f32; 4]")]
pub struct Drift {
    pub level: f32,
    pub dev: f32,
    pub sum: f32,
    /// Fast EWMA of the log value: where the level restarts after a drift is reported.
    pub recent: f32,
}

impl From<[f32; 4]> for Drift {
    fn from([level, dev, sum, recent]: [f32; 4]) -> Self {
        Self {
            level,
            dev,
            sum,
            recent,
        }
    }
}

impl From<Drift> for [f32; 4] {
    fn from(drift: Drift) -> Self {
        [drift.level, drift.dev, drift.sum, drift.recent]
    }
}

pub use custos_event::Contribution;

/// A baseline: per-feature statistics plus an hour-of-week activity profile.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Baseline {
    pub stats: Vec<Stat>,
    /// Windows learned.
    pub windows: u32,
    /// Events seen per hour of the week (Monday 00:00 UTC = 0), halved when one saturates.
    pub profile: Vec<u16>,
    /// Hours of history the profile stands for (halved with it).
    #[serde(default)]
    pub hours: f32,
    #[serde(default)]
    pub drift: Vec<Drift>,
    /// Event time of the first event counted into the profile, seconds (0: none yet).
    #[serde(default)]
    pub first: i64,
    /// Times the profile was halved.
    #[serde(default)]
    pub halvings: u32,
}

impl Default for Baseline {
    fn default() -> Self {
        Self {
            stats: vec![Stat::default(); N],
            windows: 0,
            profile: vec![0; 168],
            hours: 0.0,
            drift: vec![Drift::default(); DRIFT_FEATURES.len()],
            first: 0,
            halvings: 0,
        }
    }
}

/// Hour of the week of a UNIX time, Monday 00:00 UTC = 0.
pub fn hour_of_week(secs: i64) -> usize {
    // 1970-01-01 was a Thursday: shift by three days.
    ((secs.div_euclid(3600) + 72).rem_euclid(168)) as usize
}

/// The normal quantile z with an upper tail of `p`, from the tail bound: √(2 ln(1/p)).
pub fn surprise(p: f32) -> f32 {
    (2.0 * (1.0 / p.clamp(1e-12, 1.0)).ln()).sqrt()
}

impl Baseline {
    pub fn profile_total(&self) -> u32 {
        self.profile.iter().map(|count| u32::from(*count)).sum()
    }

    /// How busy this hour of the week usually is relative to the average hour, once the
    /// profile covers a week (otherwise 1).
    pub fn season(&self, how: usize) -> f32 {
        let total = self.profile_total();
        if self.hours < SEASON_HOURS || total < 168 || self.profile.len() != 168 {
            return 1.0;
        }
        let average = total as f32 / 168.0;
        (f32::from(self.profile[how]) / average).clamp(0.25, 4.0)
    }

    /// Whether an hour is one this agent is almost never active in: only after two weeks
    /// of history, when both that hour of the week and that hour of the day are rare.
    pub fn unusual_hour(&self, how: usize) -> bool {
        let total = self.profile_total();
        if self.hours < UNUSUAL_HOURS || total < 500 || self.profile.len() != 168 {
            return false;
        }
        let per_hour = total as f32 / 168.0;
        let per_day_hour = total as f32 / 24.0;
        f32::from(self.profile[how]) < 0.05 * per_hour && (self.hour_of_day_total(how % 24) as f32) < 0.1 * per_day_hour
    }

    /// Events in the profile at this hour of the day, summed over the days of the week.
    pub fn hour_of_day_total(&self, hour: usize) -> u32 {
        if self.profile.len() != 168 {
            return 0;
        }
        (0..7).map(|day| u32::from(self.profile[day * 24 + hour % 24])).sum()
    }

    /// Events per hour expected at hour-of-week `how` at time `now` (seconds): the
    /// profile's count at that hour of the day, pooled over days of the same class
    /// (Monday to Friday, or the weekend), divided by how often those hours have occurred
    /// since the first event. `None` while no such hour has occurred yet (a weekday agent
    /// in its first week has no expectation for its first Saturday).
    pub fn expected_rate(&self, how: usize, now: i64) -> Option<f32> {
        if self.profile.len() != 168 || self.first == 0 || now <= self.first {
            return None;
        }
        let first_hour = self.first.div_euclid(3600);
        let elapsed = now.div_euclid(3600) - first_hour;
        if elapsed <= 0 {
            return None;
        }
        let start = hour_of_week(self.first) as i64;
        let occurrences = |h: usize| -> i64 {
            let offset = (h as i64 - start).rem_euclid(168);
            elapsed / 168 + i64::from(offset < elapsed % 168)
        };
        let weekend = how / 24 >= 5;
        let days: Vec<usize> = if weekend { vec![5, 6] } else { vec![0, 1, 2, 3, 4] };
        let hod = how % 24;
        let (mut count, mut seen) = (0u32, 0i64);
        for day in days {
            let h = day * 24 + hod;
            count += u32::from(self.profile[h]);
            seen += occurrences(h);
        }
        // Three occurrences at least: one busy Tuesday morning is not yet a rhythm.
        if seen < 3 {
            return None;
        }
        // The profile halves when a slot saturates: scale occurrences down alike.
        let scale = 0.5f32.powi(self.halvings.min(30) as i32);
        Some(count as f32 / (seen as f32 * scale))
    }

    /// Counts events at time `ts` into the profile; `elapsed_hours` of history passed
    /// since the last count.
    pub fn count_hour(&mut self, ts: i64, events: u32, elapsed_hours: f32) {
        let how = hour_of_week(ts);
        if self.first == 0 {
            self.first = ts;
        }
        if self.profile.len() != 168 {
            self.profile = vec![0; 168];
        }
        self.hours += elapsed_hours.max(0.0);
        let next = u32::from(self.profile[how]) + events;
        if next > u32::from(u16::MAX) {
            for count in &mut self.profile {
                *count /= 2;
            }
            self.hours /= 2.0;
            self.halvings += 1;
        }
        self.profile[how] = (u32::from(self.profile[how]) + events).min(u32::from(u16::MAX)) as u16;
    }

    /// Expected value and spread of feature `f` in a window at hour-of-week `how`.
    pub fn expect(&self, f: usize, how: usize) -> (f32, f32) {
        self.expect_given(f, how, 1.0)
    }

    /// The same, for a window `ratio` times as busy as usual: features that grow with
    /// activity ([`CONDITIONAL`]) are expected in proportion, so a busy window of a
    /// bursty agent is judged once, by its activity, not again by each feature that
    /// moves with it.
    pub fn expect_given(&self, f: usize, how: usize, ratio: f32) -> (f32, f32) {
        let stat = self.stats.get(f).copied().unwrap_or_default();
        // Windows are scored only when the agent is active, so the weekly rhythm says
        // how often windows come, not how busy one is: no seasonal scaling here (the
        // rhythm drives silence instead).
        let _ = how;
        let scale = if CONDITIONAL[f] { ratio } else { 1.0 };
        let expected = stat.mean * scale;
        let mut spread = (1.4826 * stat.dev * scale.sqrt())
            .max(FLOORS[f])
            .max(RELATIVE[f] * expected.abs());
        if COUNT[f] {
            spread = spread.max(expected.max(0.0).sqrt());
        }
        (expected, spread)
    }

    /// Deviations of `vector` from this baseline, in [`crate::features::FEATURES`] order.
    pub fn score(&self, vector: &[f32; N], how: usize) -> Vec<Contribution> {
        let (usual, _) = self.expect(0, how);
        let ratio = (vector[0] / usual.max(0.5)).clamp(0.25, 20.0);
        (0..N)
            .map(|f| {
                let (expected, spread) = self.expect_given(f, how, ratio);
                let mut deviation = (vector[f] - expected) / spread;
                if RARE[f] && vector[f] >= 1.0 && expected < 0.5 {
                    let stat = self.stats.get(f).copied().unwrap_or_default();
                    let floor = 1.0 / (self.windows as f32 + 2.0);
                    let p = stat.presence.max(floor) * if CONDITIONAL[f] { ratio.max(1.0) } else { 1.0 };
                    deviation = deviation.max(surprise(p.min(1.0)));
                }
                Contribution {
                    feature: crate::features::FEATURES[f].to_owned(),
                    observed: f64::from(vector[f]),
                    expected: f64::from(expected),
                    deviation: f64::from(deviation),
                }
            })
            .collect()
    }

    /// Learns one window. Returns the drift features whose test fired, with the
    /// reference level before the window and the recent level (both as values, not logs).
    pub fn learn(&mut self, vector: &[f32; N], how: usize, config: &BaselineConfig) -> Vec<Contribution> {
        self.learn_with(vector, how, config, None)
    }

    /// [`Baseline::learn`], with the window's share of outward sends that went to
    /// destinations the agent first sent to recently (concentration on a new recipient;
    /// `None` when the window sent nothing out).
    pub fn learn_with(
        &mut self,
        vector: &[f32; N],
        how: usize,
        config: &BaselineConfig,
        young_share: Option<f32>,
    ) -> Vec<Contribution> {
        if self.stats.len() != N {
            self.stats = vec![Stat::default(); N];
        }
        let first = self.windows == 0;
        for f in 0..N {
            let (expected, spread) = self.expect(f, how);
            let stat = &mut self.stats[f];
            let present = if vector[f] > 0.0 { 1.0 } else { 0.0 };
            if first {
                *stat = Stat {
                    mean: vector[f],
                    dev: FLOORS[f] / 1.4826,
                    presence: present,
                };
                continue;
            }
            let x = vector[f].clamp(expected - config.clip * spread, expected + config.clip * spread);
            stat.dev += config.alpha * ((x - stat.mean).abs() - stat.dev);
            stat.mean += config.alpha * (x - stat.mean);
            stat.presence += PRESENCE_ALPHA * (present - stat.presence);
        }
        let drifted = self.learn_drift(vector, config, young_share);
        self.windows = self.windows.saturating_add(1);
        drifted
    }

    fn learn_drift(
        &mut self,
        vector: &[f32; N],
        config: &BaselineConfig,
        young_share: Option<f32>,
    ) -> Vec<Contribution> {
        if self.drift.len() != DRIFT_FEATURES.len() {
            self.drift = vec![Drift::default(); DRIFT_FEATURES.len()];
        }
        let per_event = if vector[0] > 0.0 { vector[6] / vector[0] } else { 0.0 };
        // The share is shifted by one so that a window sending only to established
        // destinations (share 0) still teaches the reference.
        let young = young_share.map_or(0.0, |share| 1.0 + share);
        let values = [vector[0], vector[2], vector[6], vector[7], per_event, young];
        let n = self.windows as f32;
        let mut fired = Vec::new();
        for (d, value) in values.into_iter().enumerate() {
            // A window without any bytes or tokens says nothing about their level (most
            // windows of most agents hold no LLM call): only windows that have some count.
            if value <= 0.0 {
                continue;
            }
            let log = value.ln_1p();
            let state = &mut self.drift[d];
            state.recent += 0.05 * (log - state.recent);
            if self.windows < DRIFT_WARMUP {
                // A plain running mean and mean absolute deviation while warming up.
                let step = 1.0 / (n + 1.0);
                if self.windows == 0 || state.level == 0.0 {
                    state.recent = log;
                    state.level = log;
                }
                state.dev += step * ((log - state.level).abs() - state.dev);
                state.level += step * (log - state.level);
                continue;
            }
            let scale = (1.25 * state.dev).max(0.1);
            let z = (log - state.level) / scale;

            state.sum = (state.sum + z.min(3.0) - config.drift_delta).max(0.0);
            if state.sum > config.drift_lambda {
                fired.push(Contribution {
                    feature: DRIFT_FEATURES[d].to_owned(),
                    observed: f64::from(state.recent.exp_m1()),
                    expected: f64::from(state.level.exp_m1()),
                    deviation: f64::from(state.sum),
                });
                state.sum = 0.0;
                state.level = state.recent;
                continue;
            }
            // The reference learns slowly and only from values near it: a rise is clipped
            // at one deviation above, so a ramp is not absorbed as fast as it climbs.
            let clipped = log.min(state.level + scale);
            state.dev += config.drift_alpha * ((log - state.level).abs().min(3.0 * scale) - state.dev);
            state.level += config.drift_alpha * (clipped - state.level);
        }
        fired
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn steady(value: f32) -> [f32; N] {
        let mut v = [0.0; N];
        v[0] = value;
        v
    }

    #[test]
    fn a_spike_deviates_and_a_steady_value_does_not() {
        let mut baseline = Baseline::default();
        let config = BaselineConfig::default();
        for i in 0..200 {
            baseline.learn(&steady(10.0 + (i % 3) as f32), 0, &config);
        }
        let calm = baseline.score(&steady(11.0), 0);
        assert!(calm[0].deviation < 1.0, "{calm:?}");
        let spike = baseline.score(&steady(80.0), 0);
        assert_eq!(spike[0].feature, "events");
        assert!(spike[0].deviation > 10.0, "{spike:?}");
    }

    #[test]
    fn slow_drift_fires_the_page_hinkley_test() {
        let mut baseline = Baseline::default();
        let config = BaselineConfig::default();
        for _ in 0..300 {
            assert!(baseline.learn(&steady(10.0), 0, &config).is_empty());
        }
        const { assert!(300 > DRIFT_WARMUP) };
        // Creep up by 1% a window: never a spike, but a sustained shift.
        let mut fired = false;
        for step in 0..400 {
            let value = 10.0 * 1.01f32.powi(step.min(200));
            if !baseline.learn(&steady(value), 0, &config).is_empty() {
                fired = true;
                break;
            }
        }
        assert!(fired, "drift was not detected");
    }

    #[test]
    fn hour_of_week_starts_on_monday() {
        // 1970-01-05 00:00 UTC was a Monday.
        assert_eq!(hour_of_week(4 * 86400), 0);
        assert_eq!(hour_of_week(4 * 86400 + 3600 * 25), 25);
    }
}
