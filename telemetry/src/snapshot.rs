//! Metrics as plain values, for views computed in process: the dashboard
//! keeps a snapshot a second and reads windows as differences between two
//! of them, as Prometheus's `increase()` and `histogram_quantile()` would.

use std::collections::HashMap;

use opentelemetry_sdk::metrics::data::{AggregatedMetrics, MetricData, ResourceMetrics};

/// One metric's series at one moment.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    series: HashMap<String, Vec<Series>>,
}

#[derive(Debug, Clone)]
pub struct Series {
    pub labels: Vec<(String, String)>,
    pub point: Point,
}

#[derive(Debug, Clone)]
pub enum Point {
    /// A counter's cumulative value or a gauge's current one.
    Scalar(f64),
    Histogram(Buckets),
}

/// A histogram's cumulative buckets: `counts[i]` values fell at or below
/// `bounds[i]` and above the bound before; the last count is past the last
/// bound.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Buckets {
    pub bounds: Vec<f64>,
    pub counts: Vec<u64>,
    pub sum: f64,
}

impl Buckets {
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// Adds `other`'s counts (the same bounds) to these.
    pub fn merge(&mut self, other: &Buckets) {
        if self.bounds.is_empty() {
            *self = other.clone();
            return;
        }
        if self.bounds != other.bounds {
            return;
        }
        for (count, more) in self.counts.iter_mut().zip(&other.counts) {
            *count += more;
        }
        self.sum += other.sum;
    }

    /// What was added between `earlier` and these (both cumulative).
    pub fn since(&self, earlier: &Buckets) -> Buckets {
        if earlier.bounds != self.bounds {
            return self.clone();
        }
        Buckets {
            bounds: self.bounds.clone(),
            counts: self
                .counts
                .iter()
                .zip(&earlier.counts)
                .map(|(now, then)| now.saturating_sub(*then))
                .collect(),
            sum: self.sum - earlier.sum,
        }
    }

    /// The `q` quantile (0-1), interpolated linearly inside its bucket as
    /// Prometheus's `histogram_quantile` does; `None` with no values. A
    /// quantile past the last bound is that bound.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let total = self.count();
        if total == 0 {
            return None;
        }
        let rank = q.clamp(0.0, 1.0) * total as f64;
        let mut below = 0u64;
        for (i, &count) in self.counts.iter().enumerate() {
            if (below + count) as f64 >= rank && count > 0 {
                let Some(&upper) = self.bounds.get(i) else {
                    return self.bounds.last().copied();
                };
                let lower = if i == 0 { 0.0 } else { self.bounds[i - 1] };
                let into = (rank - below as f64) / count as f64;
                return Some(lower + (upper - lower) * into);
            }
            below += count;
        }
        self.bounds.last().copied()
    }
}

impl Snapshot {
    pub fn from_metrics(metrics: &ResourceMetrics) -> Self {
        let mut series: HashMap<String, Vec<Series>> = HashMap::new();
        for scope in metrics.scope_metrics() {
            for metric in scope.metrics() {
                let entry = series.entry(metric.name().to_owned()).or_default();
                match metric.data() {
                    AggregatedMetrics::F64(data) => read_f64(data, entry),
                    AggregatedMetrics::U64(data) => read_u64(data, entry),
                    AggregatedMetrics::I64(_) => {}
                }
            }
        }
        Self { series }
    }

    pub fn series(&self, name: &str) -> &[Series] {
        self.series.get(name).map(Vec::as_slice).unwrap_or(&[])
    }

    /// The sum of `name`'s scalar series whose labels pass `keep`.
    pub fn sum(&self, name: &str, keep: impl Fn(&Labels) -> bool) -> f64 {
        self.series(name)
            .iter()
            .filter(|series| keep(&Labels(&series.labels)))
            .map(|series| match series.point {
                Point::Scalar(value) => value,
                Point::Histogram(_) => 0.0,
            })
            .sum()
    }

    /// `name`'s histogram series whose labels pass `keep`, merged.
    pub fn histogram(&self, name: &str, keep: impl Fn(&Labels) -> bool) -> Buckets {
        let mut merged = Buckets::default();
        for series in self.series(name) {
            if let Point::Histogram(buckets) = &series.point
                && keep(&Labels(&series.labels))
            {
                merged.merge(buckets);
            }
        }
        merged
    }
}

/// A series' labels, for filters.
pub struct Labels<'a>(&'a [(String, String)]);

impl Labels<'_> {
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(name, _)| name == key)
            .map(|(_, value)| value.as_str())
    }

    /// Whether label `key` is `value`.
    pub fn is(&self, key: &str, value: &str) -> bool {
        self.get(key) == Some(value)
    }
}

fn labels<'a>(
    attributes: impl Iterator<Item = &'a opentelemetry::KeyValue>,
) -> Vec<(String, String)> {
    attributes
        .map(|kv| (kv.key.to_string(), kv.value.to_string()))
        .collect()
}

fn read_f64(data: &MetricData<f64>, into: &mut Vec<Series>) {
    match data {
        MetricData::Sum(sum) => into.extend(sum.data_points().map(|point| Series {
            labels: labels(point.attributes()),
            point: Point::Scalar(point.value()),
        })),
        MetricData::Gauge(gauge) => into.extend(gauge.data_points().map(|point| Series {
            labels: labels(point.attributes()),
            point: Point::Scalar(point.value()),
        })),
        MetricData::Histogram(histogram) => {
            into.extend(histogram.data_points().map(|point| Series {
                labels: labels(point.attributes()),
                point: Point::Histogram(Buckets {
                    bounds: point.bounds().collect(),
                    counts: point.bucket_counts().collect(),
                    sum: point.sum(),
                }),
            }))
        }
        MetricData::ExponentialHistogram(_) => {}
    }
}

fn read_u64(data: &MetricData<u64>, into: &mut Vec<Series>) {
    match data {
        MetricData::Sum(sum) => into.extend(sum.data_points().map(|point| Series {
            labels: labels(point.attributes()),
            point: Point::Scalar(point.value() as f64),
        })),
        MetricData::Gauge(gauge) => into.extend(gauge.data_points().map(|point| Series {
            labels: labels(point.attributes()),
            point: Point::Scalar(point.value() as f64),
        })),
        MetricData::Histogram(_) | MetricData::ExponentialHistogram(_) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn buckets(counts: &[u64]) -> Buckets {
        Buckets {
            bounds: vec![1.0, 2.0, 4.0],
            counts: counts.to_vec(),
            sum: 0.0,
        }
    }

    #[test]
    fn quantiles_interpolate_inside_their_bucket() {
        let window = buckets(&[0, 10, 10, 0]);
        assert_eq!(window.quantile(0.5), Some(2.0));
        assert_eq!(window.quantile(0.25), Some(1.5));
        assert_eq!(window.quantile(0.75), Some(3.0));
        assert_eq!(buckets(&[0, 0, 0, 0]).quantile(0.5), None);
        assert_eq!(
            buckets(&[0, 0, 0, 5]).quantile(0.99),
            Some(4.0),
            "past the last bound"
        );
    }

    #[test]
    fn a_window_is_the_difference_of_two_cumulative_snapshots() {
        let earlier = buckets(&[1, 2, 3, 0]);
        let now = buckets(&[1, 5, 3, 2]);
        assert_eq!(now.since(&earlier).counts, vec![0, 3, 0, 2]);
        let mut merged = buckets(&[1, 0, 0, 0]);
        merged.merge(&buckets(&[0, 1, 0, 0]));
        assert_eq!(merged.counts, vec![1, 1, 0, 0]);
    }
}
