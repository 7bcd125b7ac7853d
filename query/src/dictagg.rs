//! Partial aggregation grouped by dictionary columns, numbering groups by dictionary key.
//!
//! DataFusion 55 groups by a dictionary column through its row format: every input row's
//! key columns are encoded to bytes and hashed, even when the groups are a few hundred
//! (realm × action). Our views hand the few-valued text columns on as dictionaries, so
//! that is the cost of every `GROUP BY realm, action`. This module replaces only the
//! numbering of groups in the first (partial) stage:
//!
//! ```text
//!   scan ─▶ AggregateExec(Partial) ─▶ repartition ─▶ AggregateExec(FinalPartitioned)
//!                    │ replaced by
//!                    ▼
//!   scan ─▶ DictionaryGroupExec ──────▶ repartition ─▶ AggregateExec(FinalPartitioned)
//!             per batch: key tuple ─▶ dense table ─▶ group index
//!             then the aggregate's own GroupsAccumulator (count, sum, ...)
//! ```
//!
//! Per batch, each column's dictionary keys index a small table (the product of the
//! batch's dictionary sizes, when that is small) that remembers the group of each key
//! tuple seen, so a row costs a table lookup, and a value's text is hashed once per
//! batch, not once per row. The aggregates are DataFusion's own accumulators, fed the
//! same values, group indices and filters the stock operator would feed them, and the
//! output is the stock partial schema, so the final stage is unchanged. Anything else
//! (grouping sets, ordered input, limits, non-dictionary keys, aggregates without a
//! groups accumulator) keeps the stock operator.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use arrow::array::{
    Array, ArrayData, ArrayRef, AsArray, BooleanArray, DictionaryArray, Int32Array, RecordBatch, StringArray,
};
use arrow::datatypes::{DataType, Int32Type, SchemaRef};
use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::common::{DataFusionError, Result};
use datafusion::config::ConfigOptions;
use datafusion::execution::memory_pool::{MemoryConsumer, MemoryReservation};
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::logical_expr::{EmitTo, GroupsAccumulator};
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_expr::expressions::Column;
use datafusion::physical_optimizer::PhysicalOptimizerRule;
use datafusion::physical_plan::aggregates::{AggregateExec, AggregateMode};
use datafusion::physical_plan::metrics::{BaselineMetrics, ExecutionPlanMetricsSet, MetricsSet};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{DisplayAs, DisplayFormatType, ExecutionPlan, InputOrderMode, PlanProperties};
use futures::StreamExt as _;

/// Most group columns the operator takes.
const MAX_KEYS: usize = 4;
/// Largest per-batch table of key tuples; past it, each row looks its tuple up by hash.
const MAX_DENSE: usize = 1 << 16;
const UNSEEN: u32 = u32::MAX;

/// The physical optimiser rule: swaps each eligible partial aggregate for a
/// [`DictionaryGroupExec`]. It runs after DataFusion's own rules.
#[derive(Debug, Default)]
pub struct DictionaryGroupBy;

impl PhysicalOptimizerRule for DictionaryGroupBy {
    fn optimize(&self, plan: Arc<dyn ExecutionPlan>, _config: &ConfigOptions) -> Result<Arc<dyn ExecutionPlan>> {
        plan.transform_up(|node| {
            let Some(aggregate) = node.downcast_ref::<AggregateExec>() else {
                return Ok(Transformed::no(node));
            };
            match DictionaryGroupExec::try_new(aggregate, &node) {
                Some(exec) => Ok(Transformed::yes(Arc::new(exec) as Arc<dyn ExecutionPlan>)),
                None => Ok(Transformed::no(node)),
            }
        })
        .map(|transformed| transformed.data)
    }

    fn name(&self) -> &str {
        "dictionary_group_by"
    }

    fn schema_check(&self) -> bool {
        true
    }
}

/// A partial aggregate whose group keys are all `Dictionary(Int32, Utf8)` columns.
#[derive(Debug)]
pub struct DictionaryGroupExec {
    /// The operator this replaces: its expressions, schema and plan properties.
    aggregate: Arc<dyn ExecutionPlan>,
    input: Arc<dyn ExecutionPlan>,
    /// Input column of each group key, and the key's output name.
    keys: Vec<(usize, String)>,
    metrics: ExecutionPlanMetricsSet,
}

impl DictionaryGroupExec {
    /// The replacement for `aggregate` (which is `node`), when it is eligible.
    fn try_new(aggregate: &AggregateExec, node: &Arc<dyn ExecutionPlan>) -> Option<Self> {
        if *aggregate.mode() != AggregateMode::Partial
            || !aggregate.group_expr().is_single()
            || aggregate.group_expr().expr().is_empty()
            || aggregate.group_expr().expr().len() > MAX_KEYS
            || aggregate.limit_options().is_some()
            || *aggregate.input_order_mode() != InputOrderMode::Linear
            || !aggregate.dynamic_expressions_produced().is_empty()
        {
            return None;
        }
        let schema = aggregate.input().schema();
        let dictionary = DataType::Dictionary(Box::new(DataType::Int32), Box::new(DataType::Utf8));
        let mut keys = Vec::new();
        for (expr, name) in aggregate.group_expr().expr() {
            let column = expr.downcast_ref::<Column>()?;
            if schema.fields().get(column.index())?.data_type() != &dictionary {
                return None;
            }
            keys.push((column.index(), name.clone()));
        }
        let plain = aggregate.aggr_expr().iter().all(|function| {
            function.groups_accumulator_supported() && !function.is_distinct() && function.order_bys().is_empty()
        });
        if !plain {
            return None;
        }
        Some(Self {
            aggregate: Arc::clone(node),
            input: Arc::clone(aggregate.input()),
            keys,
            metrics: ExecutionPlanMetricsSet::new(),
        })
    }

    fn stock(&self) -> &AggregateExec {
        self.aggregate
            .downcast_ref::<AggregateExec>()
            .expect("DictionaryGroupExec wraps an AggregateExec")
    }
}

impl DisplayAs for DictionaryGroupExec {
    fn fmt_as(&self, _format: DisplayFormatType, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let keys: Vec<&str> = self.keys.iter().map(|(_, name)| name.as_str()).collect();
        let aggregates: Vec<&str> = self
            .stock()
            .aggr_expr()
            .iter()
            .map(|function| function.name())
            .collect();
        write!(
            f,
            "DictionaryGroupExec: mode=Partial, gby=[{}], aggr=[{}]",
            keys.join(", "),
            aggregates.join(", ")
        )
    }
}

impl ExecutionPlan for DictionaryGroupExec {
    fn name(&self) -> &str {
        "DictionaryGroupExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        self.aggregate.properties()
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![&self.input]
    }

    fn apply_expressions(
        &self,
        f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> Result<TreeNodeRecursion>,
    ) -> Result<TreeNodeRecursion> {
        self.aggregate.apply_expressions(f)
    }

    #[allow(deprecated)]
    fn with_new_children(self: Arc<Self>, children: Vec<Arc<dyn ExecutionPlan>>) -> Result<Arc<dyn ExecutionPlan>> {
        let aggregate = Arc::clone(&self.aggregate).with_new_children(children)?;
        let stock = aggregate
            .downcast_ref::<AggregateExec>()
            .ok_or_else(|| DataFusionError::Internal("DictionaryGroupExec lost its aggregate".into()))?;
        match Self::try_new(stock, &aggregate) {
            Some(exec) => Ok(Arc::new(exec)),
            None => Ok(aggregate),
        }
    }

    fn metrics(&self) -> Option<MetricsSet> {
        Some(self.metrics.clone_inner())
    }

    fn execute(&self, partition: usize, context: Arc<TaskContext>) -> Result<SendableRecordBatchStream> {
        let stock = self.stock();
        let accumulators = stock
            .aggr_expr()
            .iter()
            .map(|function| function.create_groups_accumulator())
            .collect::<Result<Vec<_>>>()?;
        let arguments: Vec<Vec<Arc<dyn PhysicalExpr>>> = stock
            .aggr_expr()
            .iter()
            .map(|function| function.expressions())
            .collect();
        let filters = stock.filter_expr().to_vec();
        let reservation =
            MemoryConsumer::new(format!("DictionaryGroupExec[{partition}]")).register(context.memory_pool());
        let mut state = Grouping {
            columns: self.keys.iter().map(|(index, _)| *index).collect(),
            values: vec![Values::default(); self.keys.len()],
            seen: self.keys.iter().map(|_| Seen::default()).collect(),
            table: Vec::new(),
            groups: HashMap::new(),
            tuples: Vec::new(),
            accumulators,
            arguments,
            filters,
            reservation,
        };
        let schema = self.schema();
        let batch_size = context.session_config().batch_size();
        let metrics = BaselineMetrics::new(&self.metrics, partition);
        let mut input = self.input.execute(partition, context)?;
        let out_schema = Arc::clone(&schema);
        let answer = futures::stream::once(async move {
            while let Some(batch) = input.next().await {
                let batch = batch?;
                let _timer = metrics.elapsed_compute().timer();
                state.update(&batch)?;
            }
            let _timer = metrics.elapsed_compute().timer();
            let batch = state.emit(&out_schema)?;
            metrics.record_output(batch.num_rows());
            let slices: Vec<Result<RecordBatch>> = (0..batch.num_rows())
                .step_by(batch_size.max(1))
                .map(|offset| Ok(batch.slice(offset, batch_size.min(batch.num_rows() - offset))))
                .collect();
            Ok::<_, DataFusionError>(futures::stream::iter(slices))
        })
        .map(|result| match result {
            Ok(batches) => batches.boxed(),
            Err(error) => futures::stream::once(async move { Err(error) }).boxed(),
        })
        .flatten();
        Ok(Box::pin(RecordBatchStreamAdapter::new(schema, answer)))
    }
}

/// The distinct values of one group column, numbered in order of first sight.
#[derive(Clone, Default)]
struct Values {
    ids: HashMap<Box<str>, u32>,
    /// The id of null, once seen.
    null: Option<u32>,
    texts: Vec<Option<Box<str>>>,
    bytes: usize,
}

impl Values {
    fn id(&mut self, value: Option<&str>) -> u32 {
        let known = match value {
            Some(text) => self.ids.get(text).copied(),
            None => self.null,
        };
        if let Some(id) = known {
            return id;
        }
        let id = self.texts.len() as u32;
        match value {
            Some(text) => {
                self.bytes += text.len() * 2 + 64;
                self.ids.insert(text.into(), id);
            }
            None => self.null = Some(id),
        }
        self.texts.push(value.map(Box::from));
        id
    }
}

/// What one column's last batch dictionary mapped to, kept while batches share it (the
/// Parquet reader hands every batch of a column chunk the same dictionary).
#[derive(Default)]
struct Seen {
    dictionary: Option<ArrayData>,
    /// The value id of each dictionary entry (the last entry stands for null), found on
    /// first use.
    ids: Vec<u32>,
}

/// One partition's groups and accumulators.
struct Grouping {
    /// Input column of each group key.
    columns: Vec<usize>,
    values: Vec<Values>,
    seen: Vec<Seen>,
    /// The group of each tuple of dictionary entries of the current dictionaries, when
    /// their sizes' product is at most [`MAX_DENSE`]; empty otherwise.
    table: Vec<u32>,
    /// Group index of each tuple of value ids.
    groups: HashMap<[u32; MAX_KEYS], u32>,
    /// Value ids of each group, by group index.
    tuples: Vec<[u32; MAX_KEYS]>,
    accumulators: Vec<Box<dyn GroupsAccumulator>>,
    arguments: Vec<Vec<Arc<dyn PhysicalExpr>>>,
    filters: Vec<Option<Arc<dyn PhysicalExpr>>>,
    reservation: MemoryReservation,
}

impl Grouping {
    fn update(&mut self, batch: &RecordBatch) -> Result<()> {
        let rows = batch.num_rows();
        if rows == 0 {
            return Ok(());
        }
        let mut dictionaries: Vec<(&Int32Array, &StringArray)> = Vec::with_capacity(self.columns.len());
        let mut changed = false;
        for (&index, seen) in self.columns.iter().zip(self.seen.iter_mut()) {
            let column = batch.column(index);
            let dictionary: &DictionaryArray<Int32Type> = column.as_dictionary_opt().ok_or_else(|| {
                DataFusionError::Internal(format!(
                    "group column {index} is {} not a dictionary",
                    column.data_type()
                ))
            })?;
            let values = dictionary.values().as_string_opt::<i32>().ok_or_else(|| {
                DataFusionError::Internal(format!(
                    "group column {index} has {} values",
                    dictionary.values().data_type()
                ))
            })?;
            // The reader builds a new array per batch over the same buffers.
            let data = dictionary.values().to_data();
            let same = seen.dictionary.as_ref().is_some_and(|last| last.ptr_eq(&data));
            if !same {
                seen.dictionary = Some(data);
                seen.ids = vec![UNSEEN; values.len() + 1];
                changed = true;
            }
            dictionaries.push((dictionary.keys(), values));
        }
        let sizes: Vec<usize> = dictionaries.iter().map(|(_, values)| values.len() + 1).collect();
        if changed {
            let dense = sizes
                .iter()
                .try_fold(1usize, |product, size| product.checked_mul(*size));
            self.table = match dense {
                Some(size) if size <= MAX_DENSE => vec![UNSEEN; size],
                _ => Vec::new(),
            };
        }
        let table = &mut self.table;
        let mut indices = Vec::with_capacity(rows);
        for row in 0..rows {
            let mut entries = [0usize; MAX_KEYS];
            let mut cell = 0usize;
            for (column, (keys, values)) in dictionaries.iter().enumerate() {
                let null = values.len();
                let entry = if keys.is_valid(row) {
                    let key = keys.value(row);
                    match usize::try_from(key) {
                        Ok(key) if key < null => key,
                        _ => {
                            return Err(DataFusionError::Internal(format!(
                                "dictionary key {key} out of range ({null} values)"
                            )));
                        }
                    }
                } else {
                    null
                };
                entries[column] = entry;
                if !table.is_empty() {
                    cell = cell * sizes[column] + entry;
                }
            }
            if !table.is_empty() && table[cell] != UNSEEN {
                indices.push(table[cell] as usize);
                continue;
            }
            let mut tuple = [0u32; MAX_KEYS];
            for (column, (_, values)) in dictionaries.iter().enumerate() {
                let entry = entries[column];
                let ids = &mut self.seen[column].ids;
                if ids[entry] == UNSEEN {
                    let text = (entry < values.len() && values.is_valid(entry)).then(|| values.value(entry));
                    ids[entry] = self.values[column].id(text);
                }
                tuple[column] = ids[entry];
            }
            let next = self.tuples.len() as u32;
            let group = *self.groups.entry(tuple).or_insert(next);
            if group == next {
                self.tuples.push(tuple);
            }
            if !table.is_empty() {
                table[cell] = group;
            }
            indices.push(group as usize);
        }
        let groups = self.tuples.len();
        for ((accumulator, arguments), filter) in self.accumulators.iter_mut().zip(&self.arguments).zip(&self.filters) {
            let values = arguments
                .iter()
                .map(|argument| argument.evaluate(batch).and_then(|value| value.into_array(rows)))
                .collect::<Result<Vec<ArrayRef>>>()?;
            let filter = match filter {
                Some(filter) => Some(filter.evaluate(batch)?.into_array(rows)?),
                None => None,
            };
            let filter: Option<&BooleanArray> = match &filter {
                Some(array) => Some(array.as_boolean_opt().ok_or_else(|| {
                    DataFusionError::Internal(format!("aggregate filter is {} not boolean", array.data_type()))
                })?),
                None => None,
            };
            accumulator.update_batch(&values, &indices, filter, groups)?;
        }
        let held = self
            .accumulators
            .iter()
            .map(|accumulator| accumulator.size())
            .sum::<usize>()
            + self.values.iter().map(|values| values.bytes).sum::<usize>()
            + self.tuples.capacity() * std::mem::size_of::<[u32; MAX_KEYS]>() * 3;
        self.reservation.try_resize(held)?;
        Ok(())
    }

    /// The groups in the partial aggregate's schema: key columns, then each
    /// accumulator's state.
    fn emit(&mut self, schema: &SchemaRef) -> Result<RecordBatch> {
        let mut columns: Vec<ArrayRef> = Vec::with_capacity(schema.fields().len());
        for (column, values) in self.values.iter().enumerate() {
            let keys: Int32Array = self
                .tuples
                .iter()
                .map(|tuple| {
                    let id = tuple[column] as usize;
                    values.texts[id].as_ref().map(|_| id as i32)
                })
                .collect();
            let texts: StringArray = values
                .texts
                .iter()
                .map(|text| Some(text.as_deref().unwrap_or("")))
                .collect();
            columns.push(Arc::new(DictionaryArray::<Int32Type>::try_new(keys, Arc::new(texts))?));
        }
        for accumulator in &mut self.accumulators {
            columns.extend(accumulator.state(EmitTo::All)?);
        }
        self.reservation.free();
        Ok(RecordBatch::try_new(Arc::clone(schema), columns)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Int64Array, StringArray};
    use arrow::datatypes::{Field, Schema};
    use datafusion::catalog::MemTable;
    use datafusion::execution::SessionStateBuilder;
    use datafusion::execution::memory_pool::GreedyMemoryPool;
    use datafusion::execution::runtime_env::RuntimeEnvBuilder;
    use datafusion::prelude::{SessionConfig, SessionContext};

    /// A small deterministic generator, so a failure reproduces.
    struct Numbers(u64);
    impl Numbers {
        fn next(&mut self, below: u64) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 % below
        }
    }

    /// A dictionary: `texts` shuffled, with a repeated value, a null value and an
    /// unused entry.
    fn dictionary(numbers: &mut Numbers, texts: &[String]) -> ArrayRef {
        let mut values: Vec<Option<String>> = texts.iter().cloned().map(Some).collect();
        for at in (1..values.len()).rev() {
            values.swap(at, numbers.next(at as u64 + 1) as usize);
        }
        values.push(values.first().cloned().flatten());
        values.push(None);
        values.push(Some("never used".into()));
        let values: StringArray = values.iter().map(|value| value.as_deref()).collect();
        Arc::new(values)
    }

    /// A dictionary column over `values` (all but its last entry used), some keys null.
    fn column(numbers: &mut Numbers, values: &ArrayRef, rows: usize) -> ArrayRef {
        let used = values.len() as u64 - 1;
        let keys: Int32Array = (0..rows)
            .map(|_| (numbers.next(20) != 0).then(|| numbers.next(used) as i32))
            .collect();
        Arc::new(DictionaryArray::<Int32Type>::try_new(keys, Arc::clone(values)).unwrap())
    }

    /// Two partitions of four batches. Within a partition, batches share their
    /// dictionaries in pairs (as the batches of one Parquet column chunk do), and
    /// otherwise have their own.
    fn table(numbers: &mut Numbers, wide: bool) -> MemTable {
        let keyed = DataType::Dictionary(Box::new(DataType::Int32), Box::new(DataType::Utf8));
        let schema = Arc::new(Schema::new(vec![
            Field::new("a", keyed.clone(), true),
            Field::new("b", keyed, true),
            Field::new("v", DataType::Int64, true),
        ]));
        // `wide`: 300 × 300 key tuples per batch, past the dense table, so rows take the
        // hashed path.
        let (a, b) = if wide { (300, 300) } else { (5, 40) };
        let a: Vec<String> = (0..a).map(|n| format!("realm-{n}")).collect();
        let b: Vec<String> = (0..b).map(|n| format!("tool-{n}")).collect();
        let partitions = (0..2)
            .map(|_| {
                let mut shared = (dictionary(numbers, &a), dictionary(numbers, &b));
                (0..4)
                    .map(|batch| {
                        if batch % 2 == 0 {
                            shared = (dictionary(numbers, &a), dictionary(numbers, &b));
                        }
                        let rows = 500 + numbers.next(1500) as usize;
                        let v: Int64Array = (0..rows)
                            .map(|_| (numbers.next(10) != 0).then(|| numbers.next(1000) as i64 - 100))
                            .collect();
                        let columns = vec![
                            column(numbers, &shared.0, rows),
                            column(numbers, &shared.1, rows),
                            Arc::new(v) as ArrayRef,
                        ];
                        RecordBatch::try_new(Arc::clone(&schema), columns).unwrap()
                    })
                    .collect()
            })
            .collect();
        MemTable::try_new(schema, partitions).unwrap()
    }

    fn context(own: bool, memory: usize) -> SessionContext {
        let config = SessionConfig::new().with_target_partitions(2).with_batch_size(100);
        let runtime = RuntimeEnvBuilder::new()
            .with_memory_pool(Arc::new(GreedyMemoryPool::new(memory)))
            .build_arc()
            .unwrap();
        let mut state = SessionStateBuilder::new()
            .with_config(config)
            .with_runtime_env(runtime)
            .with_default_features();
        if own {
            state = state.with_physical_optimizer_rule(Arc::new(DictionaryGroupBy));
        }
        SessionContext::new_with_state(state.build())
    }

    async fn answer(ctx: &SessionContext, sql: &str) -> String {
        let batches = ctx.sql(sql).await.unwrap().collect().await.unwrap();
        arrow::util::pretty::pretty_format_batches(&batches)
            .unwrap()
            .to_string()
    }

    async fn plan(ctx: &SessionContext, sql: &str) -> String {
        answer(ctx, &format!("EXPLAIN {sql}")).await
    }

    /// Every query gives exactly the stock answer, and is planned with the operator (so
    /// this fails if the rule stops applying, not only if its answers go wrong).
    #[tokio::test]
    async fn agrees_with_the_stock_aggregate() {
        let queries = [
            "SELECT a, b, count(*) AS n FROM t GROUP BY a, b ORDER BY a, b",
            "SELECT a, count(*), count(v), sum(v), min(v), max(v), avg(v) FROM t GROUP BY a ORDER BY a",
            "SELECT b, a, count(v) FILTER (WHERE v > 500) AS big, sum(v) FROM t GROUP BY b, a ORDER BY b, a",
            "SELECT a, b, count(*) FROM t WHERE b <> 'tool-3' GROUP BY a, b HAVING count(*) < 50 ORDER BY a, b",
            // Planned as GROUP BY a, v (stock: v is no dictionary), then a count by `a`.
            "SELECT a, count(DISTINCT v) FROM t GROUP BY a ORDER BY a",
        ];
        for (seed, wide) in [(7, false), (11, false), (13, true)] {
            let mut numbers = Numbers(seed);
            let data = Arc::new(table(&mut numbers, wide));
            let ours = context(true, 64 << 20);
            let stock = context(false, 64 << 20);
            ours.register_table("t", data.clone()).unwrap();
            stock.register_table("t", data).unwrap();
            for sql in queries {
                assert!(
                    plan(&ours, sql).await.contains("DictionaryGroupExec"),
                    "not rewritten: {sql}"
                );
                assert!(!plan(&stock, sql).await.contains("DictionaryGroupExec"));
                assert_eq!(
                    answer(&ours, sql).await,
                    answer(&stock, sql).await,
                    "seed {seed}: {sql}"
                );
            }
        }
    }

    /// Grouping by a non-dictionary column, or by grouping sets, keeps the stock plan.
    #[tokio::test]
    async fn leaves_other_aggregates_alone() {
        let ctx = context(true, 64 << 20);
        ctx.register_table("t", Arc::new(table(&mut Numbers(3), false)))
            .unwrap();
        for sql in [
            "SELECT v, count(*) FROM t GROUP BY v",
            "SELECT a, v, count(*) FROM t GROUP BY a, v",
            "SELECT a, b, count(*) FROM t GROUP BY ROLLUP (a, b)",
        ] {
            assert!(!plan(&ctx, sql).await.contains("DictionaryGroupExec"), "{sql}");
        }
    }

    /// The operator's groups count against the session's memory pool.
    #[tokio::test]
    async fn stays_inside_the_memory_pool() {
        let ctx = context(true, 4 << 10);
        ctx.register_table("t", Arc::new(table(&mut Numbers(5), true))).unwrap();
        let sql = "SELECT a, b, count(*) FROM t GROUP BY a, b";
        assert!(plan(&ctx, sql).await.contains("DictionaryGroupExec"));
        let error = ctx.sql(sql).await.unwrap().collect().await.unwrap_err().to_string();
        assert!(error.contains("Resources exhausted"), "{error}");
    }
}
