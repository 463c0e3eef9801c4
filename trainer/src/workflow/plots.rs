//! The workflows' plots, as SVG through plotters' SVG backend (a well-kept crate, no
//! fonts or native libraries needed): curves (loss per step per run) and the confusion
//! matrix heat map.
use anyhow::{anyhow, Result};
use plotters::prelude::*;

/// One line of a curve plot.
pub struct Curve {
    pub label: String,
    pub points: Vec<(f64, f64)>,
}

/// Lines over a shared x axis; an empty plot says so instead of failing.
pub fn curves_svg(title: &str, x_label: &str, y_label: &str, curves: &[Curve]) -> Result<String> {
    let pts: Vec<(f64, f64)> = curves.iter().flat_map(|c| c.points.iter().copied()).filter(|(x, y)| x.is_finite() && y.is_finite()).collect();
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (760, 420)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| anyhow!("plot: {e}"))?;
        let (x0, x1) = bounds(pts.iter().map(|p| p.0));
        let (y0, y1) = bounds(pts.iter().map(|p| p.1));
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(x0..x1, y0..y1)
            .map_err(|e| anyhow!("plot: {e}"))?;
        chart.configure_mesh().x_desc(x_label).y_desc(y_label).draw().map_err(|e| anyhow!("plot: {e}"))?;
        for (i, c) in curves.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            let points: Vec<(f64, f64)> = c.points.iter().copied().filter(|(x, y)| x.is_finite() && y.is_finite()).collect();
            chart
                .draw_series(LineSeries::new(points, color.stroke_width(2)))
                .map_err(|e| anyhow!("plot: {e}"))?
                .label(c.label.clone())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
        }
        if !curves.is_empty() {
            chart.configure_series_labels().background_style(WHITE.mix(0.85)).border_style(BLACK).draw().map_err(|e| anyhow!("plot: {e}"))?;
        }
        root.present().map_err(|e| anyhow!("plot: {e}"))?;
    }
    Ok(svg)
}

/// A range that holds every value, padded by 5%; (0, 1) when there are none.
fn bounds(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values.fold((f64::MAX, f64::MIN), |(lo, hi), v| (lo.min(v), hi.max(v)));
    if lo > hi {
        return (0.0, 1.0);
    }
    let pad = ((hi - lo) * 0.05).max(1e-3);
    (lo - pad, hi + pad)
}

/// The confusion matrix as a heat map: row = true label, column = predicted label, the
/// count in each cell, darker for more.
pub fn confusion_svg(title: &str, labels: &[String], counts: &[Vec<usize>]) -> Result<String> {
    let n = labels.len().max(1);
    let cell = 56i32;
    let left = 150i32;
    let top = 70i32;
    let width = (left + cell * n as i32 + 30).max(360) as u32;
    let height = (top + cell * n as i32 + 150) as u32;
    let max = counts.iter().flatten().copied().max().unwrap_or(0).max(1) as f64;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (width, height)).into_drawing_area();
        let err = |e: DrawingAreaErrorKind<std::io::Error>| anyhow!("plot: {e}");
        root.fill(&WHITE).map_err(err)?;
        root.draw(&Text::new(title.to_string(), (10, 12), ("sans-serif", 18).into_font())).map_err(err)?;
        root.draw(&Text::new("rows: true label, columns: predicted".to_string(), (10, 38), ("sans-serif", 13).into_font())).map_err(err)?;
        for (r, row) in counts.iter().enumerate() {
            for (c, &v) in row.iter().enumerate() {
                let (x, y) = (left + c as i32 * cell, top + r as i32 * cell);
                let t = v as f64 / max;
                let shade = |full: f64| (255.0 - t * (255.0 - full)) as u8;
                let fill = RGBColor(shade(30.0), shade(90.0), shade(170.0));
                root.draw(&Rectangle::new([(x, y), (x + cell, y + cell)], fill.filled())).map_err(err)?;
                root.draw(&Rectangle::new([(x, y), (x + cell, y + cell)], BLACK.mix(0.3))).map_err(err)?;
                let ink = if t > 0.5 { WHITE } else { BLACK };
                root.draw(&Text::new(v.to_string(), (x + cell / 2 - 8, y + cell / 2 - 7), ("sans-serif", 14).into_font().color(&ink))).map_err(err)?;
            }
        }
        for (i, l) in labels.iter().enumerate() {
            let short: String = l.chars().take(18).collect();
            root.draw(&Text::new(short.clone(), (8, top + i as i32 * cell + cell / 2 - 7), ("sans-serif", 13).into_font())).map_err(err)?;
            let (x, y) = (left + i as i32 * cell + cell / 2, top + n as i32 * cell + 8);
            root.draw(&Text::new(short, (x, y), ("sans-serif", 13).into_font().transform(FontTransform::Rotate90))).map_err(err)?;
        }
        root.present().map_err(err)?;
    }
    Ok(svg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plots_are_svg_with_one_path_per_curve_and_one_cell_per_count() {
        let svg = curves_svg("t", "step", "loss", &[Curve { label: "a".into(), points: vec![(0.0, 2.0), (1.0, 1.0)] }, Curve { label: "b".into(), points: vec![(0.0, 3.0), (2.0, 1.5)] }]).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("\na\n") && svg.contains("\nb\n"), "{svg}");
        assert!(curves_svg("empty", "x", "y", &[]).unwrap().contains("empty"));
        let svg = confusion_svg("cm", &["pos".into(), "neg".into()], &[vec![5, 1], vec![0, 7]]).unwrap();
        assert!(svg.contains("\n7\n") && svg.contains("\npos\n"), "{svg}");
        assert_eq!(svg.matches("<rect").count(), 1 + 2 * 4, "background, then a filled and an outlined rectangle per cell");
    }
}
