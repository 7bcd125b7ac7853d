//! Robust online baselines: EWMA of the value and of its absolute deviation (a streaming
//! stand-in for median/MAD), with hour-of-week seasonality for activity, and a
//! Page-Hinkley test per feature for slow drift.

use serde::{Deserialize, Serialize};

use crate::features::{FLOORS, N};

/// Tuning for the baselines; see `docs/detection.md`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BaselineConfig {
    /// Weight of a new window in the mean and deviation EWMAs.
    pub alpha: f32,
    /// Weight of a new window in the slow mean the drift test compares against.
    pub drift_alpha: f32,
    /// Page-Hinkley allowance, in deviations: shifts smaller than this are ignored.
    pub drift_delta: f32,
    /// Page-Hinkley threshold, in accumulated deviations.
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

/// One feature's statistics.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Stat {
    pub mean: f32,
    pub dev: f32,
    /// Slow mean for the drift test, and the test's cumulative sum.
    pub slow: f32,
    pub drift: f32,
}

/// A deviation of one feature in one window.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Contribution {
    pub feature: String,
    pub observed: f64,
    pub expected: f64,
    /// (observed − expected) / spread: how many robust deviations above normal.
    pub deviation: f64,
}

/// A baseline: per-feature statistics plus an hour-of-week activity profile.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Baseline {
    pub stats: Vec<Stat>,
    /// Windows learned.
    pub windows: u32,
    /// Events seen per hour of the week (Monday 00:00 UTC = 0), halved when one saturates.
    pub profile: Vec<u16>,
}

impl Default for Baseline {
    fn default() -> Self {
        Self {
            stats: vec![Stat::default(); N],
            windows: 0,
            profile: vec![0; 168],
        }
    }
}

/// Hour of the week of a UNIX time, Monday 00:00 UTC = 0.
pub fn hour_of_week(secs: i64) -> usize {
    // 1970-01-01 was a Thursday: shift by three days.
    ((secs.div_euclid(3600) + 72).rem_euclid(168)) as usize
}

impl Baseline {
    pub fn profile_total(&self) -> u32 {
        self.profile.iter().map(|count| u32::from(*count)).sum()
    }

    /// How busy this hour of the week usually is relative to the average hour, once the
    /// profile has enough events to say (otherwise 1).
    pub fn season(&self, how: usize) -> f32 {
        let total = self.profile_total();
        if total < 500 || self.profile.len() != 168 {
            return 1.0;
        }
        let average = total as f32 / 168.0;
        (f32::from(self.profile[how]) / average).clamp(0.25, 4.0)
    }

    /// Whether an hour is one this agent is almost never active in.
    pub fn unusual_hour(&self, how: usize) -> bool {
        let total = self.profile_total();
        total >= 500 && self.profile.len() == 168 && (f32::from(self.profile[how]) / (total as f32 / 168.0)) < 0.05
    }

    /// Events in the profile at this hour of the day, summed over the days of the week.
    pub fn hour_of_day_total(&self, hour: usize) -> u32 {
        if self.profile.len() != 168 {
            return 0;
        }
        (0..7).map(|day| u32::from(self.profile[day * 24 + hour % 24])).sum()
    }

    /// Whether the agent is usually about as busy at hour-of-day `now` as at `last`, the
    /// hour it last reported in: silence is only news when the agent's rhythm says it
    /// should be talking (a coding agent stopping at 18:00 is not).
    /// The hour before `last` counts too, so a stray event just after the working day
    /// ends does not make the evening look busy.
    pub fn usually_active(&self, now_hour: usize, last_hour: usize) -> bool {
        let last = self
            .hour_of_day_total(last_hour)
            .max(self.hour_of_day_total(last_hour + 23));
        last > 0 && 2 * self.hour_of_day_total(now_hour) >= last
    }

    pub fn count_hour(&mut self, how: usize, events: u32) {
        if self.profile.len() != 168 {
            self.profile = vec![0; 168];
        }
        let slot = &mut self.profile[how];
        let next = u32::from(*slot) + events;
        if next > u32::from(u16::MAX) {
            for count in &mut self.profile {
                *count /= 2;
            }
        }
        self.profile[how] = (u32::from(self.profile[how]) + events).min(u32::from(u16::MAX)) as u16;
    }

    /// Expected value and spread of feature `f` in a window at hour-of-week `how`.
    pub fn expect(&self, f: usize, how: usize) -> (f32, f32) {
        let stat = self.stats.get(f).copied().unwrap_or_default();
        // Activity counts follow the weekly rhythm; rates and sizes per event do not.
        let seasonal = matches!(f, 0 | 1 | 2 | 7);
        let factor = if seasonal { self.season(how) } else { 1.0 };
        let spread = (1.4826 * stat.dev * factor.sqrt()).max(FLOORS[f]);
        (stat.mean * factor, spread)
    }

    /// Deviations of `vector` from this baseline, largest first.
    pub fn score(&self, vector: &[f32; N], how: usize) -> Vec<Contribution> {
        let mut out: Vec<Contribution> = (0..N)
            .map(|f| {
                let (expected, spread) = self.expect(f, how);
                Contribution {
                    feature: crate::features::FEATURES[f].to_owned(),
                    observed: f64::from(vector[f]),
                    expected: f64::from(expected),
                    deviation: f64::from((vector[f] - expected) / spread),
                }
            })
            .collect();
        out.sort_by(|a, b| b.deviation.total_cmp(&a.deviation));
        out
    }

    /// Learns one window. Returns the features whose drift test fired, with their slow
    /// mean before the window and the current mean.
    pub fn learn(&mut self, vector: &[f32; N], how: usize, config: &BaselineConfig) -> Vec<Contribution> {
        if self.stats.len() != N {
            self.stats = vec![Stat::default(); N];
        }
        let first = self.windows == 0;
        let mut drifted = Vec::new();
        for f in 0..N {
            let (expected, spread) = self.expect(f, how);
            let stat = &mut self.stats[f];
            if first {
                *stat = Stat {
                    mean: vector[f],
                    dev: FLOORS[f] / 1.4826,
                    slow: vector[f],
                    drift: 0.0,
                };
                continue;
            }
            let x = vector[f].clamp(expected - config.clip * spread, expected + config.clip * spread);
            stat.dev += config.alpha * ((x - stat.mean).abs() - stat.dev);
            stat.mean += config.alpha * (x - stat.mean);
            // Page-Hinkley on the standardised excess over the slow mean (upward drift),
            // once the slow mean has settled: until then it is a plain running average.
            let warm = self.windows >= DRIFT_WARMUP;
            let excess = (vector[f] - stat.slow) / spread;
            if warm {
                stat.drift = (stat.drift + excess - config.drift_delta).max(0.0);
            }
            if warm && stat.drift > config.drift_lambda {
                drifted.push(Contribution {
                    feature: crate::features::FEATURES[f].to_owned(),
                    observed: f64::from(stat.mean),
                    expected: f64::from(stat.slow),
                    deviation: f64::from(stat.drift),
                });
                stat.drift = 0.0;
                stat.slow = stat.mean;
            }
            let rate = config.drift_alpha.max(1.0 / (self.windows as f32 + 1.0));
            stat.slow += rate * (vector[f] - stat.slow);
        }
        self.windows = self.windows.saturating_add(1);
        drifted
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
        // Creep up by 2% a window: never a spike, but a sustained shift.
        let mut fired = false;
        for step in 0..400 {
            let value = 10.0 * 1.02f32.powi(step.min(100));
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
