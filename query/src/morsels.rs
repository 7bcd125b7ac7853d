//! Segment scans cut into row-group-sized byte ranges, so both cores share a query's
//! work even when its filters keep a few neighbouring segments.
//!
//! DataFusion plans a Parquet scan as one byte range per partition: with two partitions
//! over ten 1M-row segments, the first five segments go to one core and the rest to the
//! other. Its file streams share their queue (an idle partition takes the next range from
//! a sibling), but a range is the unit: a query for one day of a week-long store reads one
//! or two segments, and whichever core opens the first segment decodes most of the rows
//! while the other has nothing left to take.
//!
//! ```text
//!   DataSourceExec  [seg0 seg1 seg2 seg3 seg4 | seg5 seg6 seg7 seg8 seg9]
//!        │ this rule, after DataFusion's own
//!        ▼
//!   DataSourceExec  [seg0:0-32M seg0:64-96M … | seg0:32-64M seg0:96-128M …]
//!                    pieces of MORSEL_BYTES, dealt to the partitions in turn
//! ```
//!
//! The Parquet reader keeps a row group in the range that holds its first page, so the
//! pieces of a file read each of its row groups exactly once; a piece that holds no row
//! group start reads nothing but the (cached) footer. Scans that must keep their order
//! (a declared output ordering, an ordered limit, a declared partitioning) keep
//! their groups: their files are only cut in place.

use std::sync::Arc;

use datafusion::common::Result;
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::config::ConfigOptions;
use datafusion::datasource::listing::PartitionedFile;
use datafusion::datasource::physical_plan::{FileGroup, FileScanConfig};
use datafusion::datasource::source::DataSourceExec;
use datafusion::physical_optimizer::PhysicalOptimizerRule;
use datafusion::physical_plan::ExecutionPlan;

/// The largest byte range one file stream takes at a time: about one row group of a
/// Custos segment (128 Ki rows, 25–35 MB with payloads and signatures).
pub(crate) const MORSEL_BYTES: u64 = 32 << 20;

/// The physical optimiser rule; it runs after DataFusion's own rules, so it sees the
/// ranges `EnforceDistribution` made.
#[derive(Debug, Default)]
pub(crate) struct SplitFileRanges;

impl PhysicalOptimizerRule for SplitFileRanges {
    fn optimize(&self, plan: Arc<dyn ExecutionPlan>, _config: &ConfigOptions) -> Result<Arc<dyn ExecutionPlan>> {
        plan.transform_up(|node| {
            let Some(exec) = node.downcast_ref::<DataSourceExec>() else {
                return Ok(Transformed::no(node));
            };
            let Some(config) = exec.data_source().downcast_ref::<FileScanConfig>() else {
                return Ok(Transformed::no(node));
            };
            let Some(groups) = split(config) else {
                return Ok(Transformed::no(node));
            };
            let mut config = config.clone();
            config.file_groups = groups;
            let exec = exec.clone().with_data_source(Arc::new(config));
            Ok(Transformed::yes(Arc::new(exec) as Arc<dyn ExecutionPlan>))
        })
        .map(|transformed| transformed.data)
    }

    fn name(&self) -> &str {
        "split_file_ranges"
    }

    fn schema_check(&self) -> bool {
        true
    }
}

/// The scan's file groups with every range longer than [`MORSEL_BYTES`] cut, or `None`
/// when nothing needs cutting.
fn split(config: &FileScanConfig) -> Option<Vec<FileGroup>> {
    let partitions = config.file_groups.len();
    let long = config
        .file_groups
        .iter()
        .flat_map(FileGroup::iter)
        .any(|file| file.effective_size() > MORSEL_BYTES);
    if partitions == 0 || !long {
        return None;
    }
    // Dealing pieces to other partitions would break an order the plan relies on.
    let keep_groups =
        config.preserve_order || !config.output_ordering.is_empty() || config.output_partitioning.is_some();
    let mut groups: Vec<Vec<PartitionedFile>> = vec![Vec::new(); partitions];
    let mut turn = 0;
    for (index, group) in config.file_groups.iter().enumerate() {
        for file in group.iter() {
            for piece in pieces(file) {
                let target = if keep_groups { index } else { turn % partitions };
                groups[target].push(piece);
                turn += 1;
            }
        }
    }
    Some(groups.into_iter().map(FileGroup::new).collect())
}

/// `file`'s range cut into consecutive pieces of at most [`MORSEL_BYTES`], covering it
/// exactly.
fn pieces(file: &PartitionedFile) -> Vec<PartitionedFile> {
    let (start, end) = file.range();
    if end - start <= MORSEL_BYTES {
        return vec![file.clone()];
    }
    let mut pieces = Vec::new();
    let mut at = start;
    while at < end {
        let next = end.min(at + MORSEL_BYTES);
        // Offsets are below 2^63: they come from a file's length.
        pieces.push(file.clone().with_range(at as i64, next as i64));
        at = next;
    }
    pieces
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::datatypes::{DataType, Field, Schema};
    use datafusion::datasource::physical_plan::{FileScanConfigBuilder, ParquetSource};
    use datafusion::execution::object_store::ObjectStoreUrl;

    fn scan(groups: Vec<Vec<PartitionedFile>>, preserve_order: bool) -> FileScanConfig {
        let schema = Arc::new(Schema::new(vec![Field::new("log_index", DataType::UInt64, false)]));
        FileScanConfigBuilder::new(ObjectStoreUrl::local_filesystem(), Arc::new(ParquetSource::new(schema)))
            .with_file_groups(groups.into_iter().map(FileGroup::new).collect())
            .with_preserve_order(preserve_order)
            .build()
    }

    /// (path, start, end) of every piece, by group.
    fn layout(groups: &[FileGroup]) -> Vec<Vec<(String, u64, u64)>> {
        groups
            .iter()
            .map(|group| {
                group
                    .iter()
                    .map(|file| {
                        let (start, end) = file.range();
                        (file.path().to_string(), start, end)
                    })
                    .collect()
            })
            .collect()
    }

    /// Two partitions, as DataFusion plans them: the first holds two whole segments and
    /// the start of a third, the second the rest. The pieces are dealt in turn, so each
    /// partition gets part of every segment.
    #[test]
    fn long_ranges_are_cut_and_dealt_to_every_partition() {
        let size = 3 * MORSEL_BYTES;
        let groups = vec![
            vec![
                PartitionedFile::new("a.parquet", size),
                PartitionedFile::new("b.parquet", size),
                PartitionedFile::new("c.parquet", size).with_range(0, MORSEL_BYTES as i64),
            ],
            vec![PartitionedFile::new("c.parquet", size).with_range(MORSEL_BYTES as i64, size as i64)],
        ];
        let cut = split(&scan(groups.clone(), false)).unwrap();
        let m = MORSEL_BYTES;
        assert_eq!(
            layout(&cut),
            vec![
                vec![
                    ("a.parquet".into(), 0, m),
                    ("a.parquet".into(), 2 * m, 3 * m),
                    ("b.parquet".into(), m, 2 * m),
                    ("c.parquet".into(), 0, m),
                    ("c.parquet".into(), 2 * m, 3 * m),
                ],
                vec![
                    ("a.parquet".into(), m, 2 * m),
                    ("b.parquet".into(), 0, m),
                    ("b.parquet".into(), 2 * m, 3 * m),
                    ("c.parquet".into(), m, 2 * m),
                ],
            ]
        );
        // A scan that must keep its order is cut in place, each piece in its own group.
        let kept = split(&scan(groups, true)).unwrap();
        let kept = layout(&kept);
        assert_eq!(kept[0].len(), 7);
        assert_eq!(
            kept[1],
            vec![("c.parquet".into(), m, 2 * m), ("c.parquet".into(), 2 * m, 3 * m)]
        );
        // Short ranges are left as they are.
        let short = vec![
            vec![PartitionedFile::new("a.parquet", m)],
            vec![PartitionedFile::new("b.parquet", 10)],
        ];
        assert!(split(&scan(short, false)).is_none());
    }

    #[test]
    fn pieces_cover_the_range_exactly_once() {
        for (size, range) in [
            (10, None),
            (MORSEL_BYTES, None),
            (MORSEL_BYTES + 1, None),
            (5 * MORSEL_BYTES - 3, None),
            (5 * MORSEL_BYTES, Some((7, 3 * MORSEL_BYTES + 11))),
        ] {
            let mut file = PartitionedFile::new("segment.parquet", size);
            if let Some((start, end)) = range {
                file = file.with_range(start as i64, end as i64);
            }
            let (start, end) = file.range();
            let cut = pieces(&file);
            assert_eq!(cut.first().unwrap().range().0, start, "size {size}");
            assert_eq!(cut.last().unwrap().range().1, end, "size {size}");
            for pair in cut.windows(2) {
                assert_eq!(pair[0].range().1, pair[1].range().0, "size {size}: a gap or an overlap");
            }
            assert!(cut.iter().all(|piece| piece.effective_size() <= MORSEL_BYTES));
            assert!(cut.iter().all(|piece| piece.effective_size() > 0));
        }
    }
}
