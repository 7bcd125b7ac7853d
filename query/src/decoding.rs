//! Which filters a segment scan evaluates while decoding, and which run after it.
//!
//! Late materialisation (the Parquet reader evaluating a filter first and decoding the
//! other columns only for rows that pass) pays when the rows that pass come in runs or
//! are few: `agent = '…'`, a time range, `payload_type` (every event, or one finding in
//! thousands). It costs when a filter keeps a scattered half of the rows, as
//! `kind = 'tool_call'` does: building and applying that row selection is slower than
//! decoding the columns and filtering the batch. DataFusion pushes every filter above a
//! scan into it, so this rule splits each filter over a segment scan before that
//! happens:
//!
//! ```text
//!   FilterExec: agent = X AND kind = tool_call        FilterExec: kind = tool_call
//!     DataSourceExec (segments)             ──▶         AfterDecoding   (pushdown stops here)
//!                                                         FilterExec: agent = X   ──▶ into the scan
//!                                                           DataSourceExec (segments)
//! ```
//!
//! A conjunct goes to the decoder when every column it reads is in [`NARROW_COLUMNS`];
//! the rest stay above an [`AfterDecoding`] node, which passes rows through untouched
//! and stops the static filters above it from being pushed down. Dynamic filters (a
//! join's build side, a top-k's threshold), pushed in DataFusion's later pass, still go
//! through it to the scan.

use std::fmt;
use std::sync::Arc;

use datafusion::common::Result;
use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::config::ConfigOptions;
use datafusion::datasource::physical_plan::FileScanConfig;
use datafusion::datasource::source::DataSourceExec;
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_expr::utils::{collect_columns, conjunction, split_conjunction};
use datafusion::physical_optimizer::PhysicalOptimizerRule;
use datafusion::physical_plan::filter::{FilterExec, FilterExecBuilder};
use datafusion::physical_plan::filter_pushdown::{ChildFilterDescription, FilterDescription, FilterPushdownPhase};
use datafusion::physical_plan::{DisplayAs, DisplayFormatType, ExecutionPlan, PlanProperties};

/// Columns whose filters keep few rows, or rows in long runs (the log is in time order;
/// `payload_type` is either nearly every row or one in thousands).
pub(crate) const NARROW_COLUMNS: [&str; 13] = [
    "log_index",
    "ingest_ts",
    "ts",
    "payload_type",
    "agent",
    "keyid",
    "target",
    "session",
    "trace_id",
    "span_id",
    "parent",
    "memory_id",
    "prev",
];

/// The physical optimiser rule. It must run before DataFusion's first `FilterPushdown`
/// pass ([`crate::sql`] places it there).
#[derive(Debug, Default)]
pub(crate) struct SplitScanFilters;

impl PhysicalOptimizerRule for SplitScanFilters {
    fn optimize(&self, plan: Arc<dyn ExecutionPlan>, _config: &ConfigOptions) -> Result<Arc<dyn ExecutionPlan>> {
        plan.transform_up(|node| {
            let Some(filter) = node.downcast_ref::<FilterExec>() else {
                return Ok(Transformed::no(node));
            };
            match split(filter)? {
                Some(split) => Ok(Transformed::yes(split)),
                None => Ok(Transformed::no(node)),
            }
        })
        .map(|transformed| transformed.data)
    }

    fn name(&self) -> &str {
        "split_scan_filters"
    }

    fn schema_check(&self) -> bool {
        true
    }
}

type Conjunct = Arc<dyn PhysicalExpr>;

/// `filter` split around an [`AfterDecoding`], when it sits on a Parquet scan and has
/// conjuncts that should run after decoding.
fn split(filter: &FilterExec) -> Result<Option<Arc<dyn ExecutionPlan>>> {
    let scan = filter.input();
    let parquet = scan
        .downcast_ref::<DataSourceExec>()
        .and_then(|exec| exec.data_source().downcast_ref::<FileScanConfig>())
        .is_some_and(|config| config.file_source().file_type() == "parquet");
    if !parquet {
        return Ok(None);
    }
    let schema = scan.schema();
    let (narrow, wide): (Vec<Conjunct>, Vec<Conjunct>) = split_conjunction(filter.predicate())
        .into_iter()
        .cloned()
        .partition(|conjunct| {
            collect_columns(conjunct).iter().all(|column| {
                schema
                    .fields()
                    .get(column.index())
                    .is_some_and(|field| NARROW_COLUMNS.contains(&field.name().as_str()))
            })
        });
    if wide.is_empty() {
        return Ok(None);
    }
    let mut below = Arc::clone(scan);
    if !narrow.is_empty() {
        let decoded = FilterExecBuilder::new(conjunction(narrow), below)
            .with_default_selectivity(filter.default_selectivity())
            .with_batch_size(filter.batch_size())
            .build()?;
        below = Arc::new(decoded);
    }
    let barrier: Arc<dyn ExecutionPlan> = Arc::new(AfterDecoding::new(below));
    // Same projection, fetch and settings as the filter it replaces.
    let after = FilterExecBuilder::from(filter)
        .with_predicate(conjunction(wide))
        .with_input(barrier)
        .build()?;
    Ok(Some(Arc::new(after)))
}

/// Passes its input through; static filters above it are not pushed below it.
#[derive(Debug)]
pub(crate) struct AfterDecoding {
    input: Arc<dyn ExecutionPlan>,
}

impl AfterDecoding {
    fn new(input: Arc<dyn ExecutionPlan>) -> Self {
        Self { input }
    }
}

impl DisplayAs for AfterDecoding {
    fn fmt_as(&self, _format: DisplayFormatType, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AfterDecoding")
    }
}

impl ExecutionPlan for AfterDecoding {
    fn name(&self) -> &str {
        "AfterDecoding"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        self.input.properties()
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![&self.input]
    }

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> Result<TreeNodeRecursion>,
    ) -> Result<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn maintains_input_order(&self) -> Vec<bool> {
        vec![true]
    }

    fn benefits_from_input_partitioning(&self) -> Vec<bool> {
        vec![false]
    }

    fn with_new_children(self: Arc<Self>, mut children: Vec<Arc<dyn ExecutionPlan>>) -> Result<Arc<dyn ExecutionPlan>> {
        match (children.pop(), children.is_empty()) {
            (Some(input), true) => Ok(Arc::new(Self::new(input))),
            _ => Err(datafusion::common::DataFusionError::Internal(
                "AfterDecoding takes one child".into(),
            )),
        }
    }

    fn execute(&self, partition: usize, context: Arc<TaskContext>) -> Result<SendableRecordBatchStream> {
        self.input.execute(partition, context)
    }

    fn gather_filters_for_pushdown(
        &self,
        phase: FilterPushdownPhase,
        parent_filters: Vec<Arc<dyn PhysicalExpr>>,
        _config: &ConfigOptions,
    ) -> Result<FilterDescription> {
        // The first pass carries the static filters this node is here to hold back; the
        // later pass carries dynamic ones (join build sides, top-k), which may go on.
        match phase {
            FilterPushdownPhase::Pre => Ok(FilterDescription::all_unsupported(&parent_filters, &self.children())),
            FilterPushdownPhase::Post => {
                Ok(FilterDescription::new()
                    .with_child(ChildFilterDescription::from_child(&parent_filters, &self.input)?))
            }
        }
    }
}
