//! Peer groups: k-means clustering (linfa) over agent profiles, so an agent still
//! learning its own baseline is judged against agents that behave like it, whatever
//! realm or label they carry.
//!
//! ```text
//!  mature agents' baselines ─▶ profile (log1p of each feature's mean) ─▶ standardise
//!      ─▶ k-means for k = 2..=10 on a sample, best silhouette wins (k = 1 when no k
//!         separates the fleet) ─▶ every mature agent assigned to its nearest centroid
//!      ─▶ one peer baseline per group (members' means, spread widened by how far
//!         members sit from each other)
//!  learning agent's window ─▶ its profile so far ─▶ nearest centroid ─▶ that baseline
//! ```
//!
//! Fitting is deterministic: agents are taken in DID order and k-means uses a fixed seed,
//! so `custos eval` gets the same groups, and the same findings, on every run.

use linfa::prelude::*;
use linfa_clustering::KMeans;
use ndarray::{Array1, Array2, ArrayView1};
use serde::{Deserialize, Serialize};

use crate::baseline::{Baseline, Stat};
use crate::features::N;

/// Agents a fit needs; fewer and the detector keeps the realm-wide peer baselines.
pub const MIN_AGENTS: usize = 6;
/// Most profiles k-means and the silhouette score see (an even stride over the sorted
/// agents); every mature agent is still assigned to a group afterwards.
pub const MAX_SAMPLE: usize = 800;
/// Most groups.
pub const MAX_GROUPS: usize = 10;
/// Below this silhouette score no k separates the fleet, and one group is used.
pub const MIN_SILHOUETTE: f64 = 0.25;

/// A fitted set of peer groups.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct PeerGroups {
    /// Per-feature centre and scale that standardise a profile before distances.
    center: Vec<f64>,
    scale: Vec<f64>,
    /// Group centres, in standardised profile space.
    centroids: Vec<Vec<f64>>,
    /// One peer baseline per group.
    pub baselines: Vec<Baseline>,
    /// Mature agents assigned to each group.
    pub sizes: Vec<u32>,
    /// Mean silhouette of the chosen clustering on the sample (1 when k = 1).
    pub silhouette: f64,
    /// Event time of the fit, seconds; 0 before the first one.
    pub fitted_at: i64,
}

/// An agent's profile: log1p of each feature's typical per-window value. Uses the
/// agent's own baseline once it has learned a window, otherwise the window at hand, so
/// an agent can be placed from its first minute.
pub fn profile(baseline: &Baseline, window: &[f32; N]) -> [f64; N] {
    let mut out = [0.0; N];
    for (f, slot) in out.iter_mut().enumerate() {
        let value = if baseline.windows == 0 {
            window[f]
        } else {
            baseline.stats.get(f).map_or(0.0, |stat| stat.mean)
        };
        *slot = f64::from(value.max(0.0)).ln_1p();
    }
    out
}

impl PeerGroups {
    pub fn is_empty(&self) -> bool {
        self.centroids.is_empty()
    }

    pub fn len(&self) -> usize {
        self.centroids.len()
    }

    /// Fits groups over `members` (mature agents' baselines, in a stable order).
    /// `None` when there are too few.
    pub fn fit(members: &[&Baseline], now: i64) -> Option<Self> {
        if members.len() < MIN_AGENTS {
            return None;
        }
        let rows: Vec<[f64; N]> = members.iter().map(|baseline| profile(baseline, &[0.0; N])).collect();
        let count = rows.len() as f64;
        let mut center = vec![0.0; N];
        for row in &rows {
            for (f, value) in row.iter().enumerate() {
                center[f] += value / count;
            }
        }
        let mut scale = vec![0.0; N];
        for row in &rows {
            for (f, value) in row.iter().enumerate() {
                scale[f] += (value - center[f]).powi(2) / count;
            }
        }
        // A feature every agent shares (all zero, say) must not divide by zero.
        for value in &mut scale {
            *value = if *value > 1e-6 { value.sqrt() } else { 1.0 };
        }
        let standard = Array2::from_shape_fn((rows.len(), N), |(i, f)| (rows[i][f] - center[f]) / scale[f]);
        let stride = rows.len().div_ceil(MAX_SAMPLE);
        let picked: Vec<usize> = (0..rows.len()).step_by(stride).collect();
        let sample = standard.select(ndarray::Axis(0), &picked);

        let mut best: Option<(f64, Array2<f64>)> = None;
        let most = (sample.nrows() / 3).min(MAX_GROUPS);
        for k in 2..=most {
            let dataset = DatasetBase::from(sample.clone());
            let Ok(model) = KMeans::params(k)
                .n_runs(4)
                .max_n_iterations(100)
                .tolerance(1e-4)
                .fit(&dataset)
            else {
                continue;
            };
            let labels: Array1<usize> = model.predict(&sample);
            let mut used = vec![false; k];
            for label in &labels {
                used[*label] = true;
            }
            if used.contains(&false) {
                // A degenerate fit (an empty group) says nothing about k groups.
                continue;
            }
            let Ok(score) = DatasetBase::new(sample.clone(), labels).silhouette_score() else {
                continue;
            };
            if best.as_ref().is_none_or(|(top, _)| score > *top + 1e-9) {
                best = Some((score, model.centroids().clone()));
            }
        }
        let (silhouette, centroids) = match best {
            Some((score, centroids)) if score >= MIN_SILHOUETTE => (score, centroids),
            // No k separates the fleet: one group, centred on the mean (0 when standardised).
            _ => (1.0, Array2::zeros((1, N))),
        };
        let centroids: Vec<Vec<f64>> = centroids.rows().into_iter().map(|row| row.to_vec()).collect();
        let mut groups = Self {
            center,
            scale,
            centroids,
            baselines: Vec::new(),
            sizes: Vec::new(),
            silhouette,
            fitted_at: now,
        };
        let mut assigned: Vec<Vec<&Baseline>> = vec![Vec::new(); groups.centroids.len()];
        for (i, baseline) in members.iter().enumerate() {
            let group = groups.nearest_standard(standard.row(i));
            assigned[group].push(baseline);
        }
        // A centroid no member is nearest to is not a group.
        let kept: Vec<usize> = (0..assigned.len())
            .filter(|group| !assigned[*group].is_empty())
            .collect();
        groups.centroids = kept.iter().map(|group| groups.centroids[*group].clone()).collect();
        let assigned: Vec<Vec<&Baseline>> = kept.iter().map(|group| assigned[*group].clone()).collect();
        groups.sizes = assigned.iter().map(|members| members.len() as u32).collect();
        groups.baselines = assigned.iter().map(|members| aggregate(members)).collect();
        Some(groups)
    }

    /// The group nearest to `profile`, and its size. `None` before a fit, or when the
    /// nearest group is empty.
    pub fn nearest(&self, profile: &[f64; N]) -> Option<(usize, u32)> {
        if self.is_empty() || self.center.len() != N || self.scale.len() != N {
            return None;
        }
        let standard = Array1::from_shape_fn(N, |f| (profile[f] - self.center[f]) / self.scale[f]);
        let group = self.nearest_standard(standard.view());
        let size = self.sizes.get(group).copied().unwrap_or(0);
        (size > 0).then_some((group, size))
    }

    fn nearest_standard(&self, point: ArrayView1<'_, f64>) -> usize {
        let mut best = (0, f64::INFINITY);
        for (group, centroid) in self.centroids.iter().enumerate() {
            let distance: f64 = centroid.iter().zip(point.iter()).map(|(c, p)| (c - p).powi(2)).sum();
            if distance < best.1 {
                best = (group, distance);
            }
        }
        best.0
    }
}

/// A group's baseline: the members' mean of each feature, with a spread that is the
/// members' own typical deviation plus how far their means sit from the group's, so a
/// group of unlike agents is judged loosely. The hour-of-week profile is the members'
/// average.
fn aggregate(members: &[&Baseline]) -> Baseline {
    let mut baseline = Baseline::default();
    if members.is_empty() {
        return baseline;
    }
    let count = members.len() as f32;
    let stat = |member: &Baseline, f: usize| member.stats.get(f).copied().unwrap_or_default();
    for f in 0..N {
        let mean = members.iter().map(|member| stat(member, f).mean).sum::<f32>() / count;
        let within = members.iter().map(|member| stat(member, f).dev).sum::<f32>() / count;
        let between = members
            .iter()
            .map(|member| (stat(member, f).mean - mean).abs())
            .sum::<f32>()
            / count;
        let presence = members.iter().map(|member| stat(member, f).presence).sum::<f32>() / count;
        baseline.stats[f] = Stat {
            mean,
            dev: within + between,
            presence,
        };
    }
    for hour in 0..168 {
        let total: u32 = members
            .iter()
            .map(|member| u32::from(member.profile.get(hour).copied().unwrap_or(0)))
            .sum();
        baseline.profile[hour] = (total / members.len() as u32).min(u32::from(u16::MAX)) as u16;
    }
    baseline.windows = members.iter().map(|member| member.windows).min().unwrap_or(0);
    baseline.hours = members.iter().map(|member| member.hours).sum::<f32>() / count;
    baseline
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::baseline::BaselineConfig;

    fn trained(events: f32, bytes: f32) -> Baseline {
        let mut baseline = Baseline::default();
        let config = BaselineConfig::default();
        for i in 0..60 {
            let mut window = [0.0; N];
            window[0] = events + (i % 3) as f32;
            window[6] = bytes * (1.0 + (i % 5) as f32 / 10.0);
            baseline.learn(&window, 0, &config);
        }
        baseline
    }

    #[test]
    fn two_kinds_of_agent_make_two_groups_and_a_newcomer_joins_its_kind() {
        let quiet: Vec<Baseline> = (0..8).map(|i| trained(3.0 + i as f32 * 0.1, 1_000.0)).collect();
        let busy: Vec<Baseline> = (0..8).map(|i| trained(80.0 + i as f32, 2_000_000.0)).collect();
        let members: Vec<&Baseline> = quiet.iter().chain(&busy).collect();
        let groups = PeerGroups::fit(&members, 100).expect("enough agents");
        assert_eq!(groups.len(), 2, "{groups:?}");
        assert_eq!(groups.sizes.iter().sum::<u32>(), 16);
        assert!(groups.silhouette > 0.5, "{}", groups.silhouette);

        let mut first_window = [0.0; N];
        first_window[0] = 85.0;
        first_window[6] = 2_500_000.0;
        let (group, size) = groups
            .nearest(&profile(&Baseline::default(), &first_window))
            .expect("a group");
        assert_eq!(size, 8);
        let expected = groups.baselines[group].expect(0, 0).0;
        assert!(
            expected > 50.0,
            "a busy newcomer is compared with busy agents, not {expected}"
        );

        // The same window is an outlier for the quiet group.
        let other = 1 - group;
        let deviation = groups.baselines[other].score(&first_window, 0)[0].deviation;
        assert!(deviation > 5.0, "{deviation}");
    }

    #[test]
    fn a_uniform_fleet_is_one_group_and_a_small_one_is_not_fitted() {
        let same: Vec<Baseline> = (0..12).map(|_| trained(10.0, 5_000.0)).collect();
        let members: Vec<&Baseline> = same.iter().collect();
        let groups = PeerGroups::fit(&members, 0).expect("enough agents");
        assert_eq!(groups.len(), 1, "{groups:?}");
        assert_eq!(groups.sizes, vec![12]);
        assert!(PeerGroups::fit(&members[..MIN_AGENTS - 1], 0).is_none());
    }

    #[test]
    fn fitting_is_deterministic() {
        let fleet: Vec<Baseline> = (0..30)
            .map(|i| trained((i % 3) as f32 * 30.0 + 2.0, ((i % 3) as f32 + 1.0) * 40_000.0))
            .collect();
        let members: Vec<&Baseline> = fleet.iter().collect();
        assert_eq!(PeerGroups::fit(&members, 7), PeerGroups::fit(&members, 7));
    }
}
