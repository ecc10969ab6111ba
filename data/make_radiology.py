"""Writes data/radiology.csv: a synthetic sample of radiology reports (id, modality, indication, comparison,
findings, impression).

Every report is composed here from sentence pools, so the sample is ours to ship. It is
seeded: running this script again writes the same file. The indication and comparison columns come from a
second random stream, so that the findings and impressions are those the file had before it had them.

    python data/make_radiology.py [--rows 300] [--seed 7] [--out data/radiology.csv]
"""

import argparse
import csv
import random
from pathlib import Path

# Per study: (normal findings, abnormal findings with the impression each implies, normal impression).
STUDIES = {
    "Chest X-ray": (
        [
            "The lungs are clear bilaterally.",
            "No pleural effusion or pneumothorax.",
            "The cardiomediastinal silhouette is within normal limits.",
            "No acute osseous abnormality.",
            "The trachea is midline.",
        ],
        [
            ("There is patchy airspace opacity in the right lower lobe.", "Right lower lobe pneumonia."),
            ("Small left pleural effusion with adjacent atelectasis.", "Small left pleural effusion."),
            ("The heart is enlarged with a cardiothoracic ratio of 0.58.", "Cardiomegaly."),
            ("Linear opacities at both bases, likely subsegmental atelectasis.", "Bibasilar atelectasis."),
            ("A 2.1 cm nodule projects over the left upper lobe.", "Left upper lobe nodule; CT recommended."),
            ("Apical lucency on the right without lung markings, consistent with pneumothorax.",
             "Right apical pneumothorax."),
        ],
        "No acute cardiopulmonary process.",
    ),
    "CT head": (
        [
            "No intracranial hemorrhage, mass effect or midline shift.",
            "The ventricles and sulci are normal in size for age.",
            "Gray-white matter differentiation is preserved.",
            "The visualized paranasal sinuses and mastoid air cells are clear.",
        ],
        [
            ("Hypodensity in the left MCA territory with loss of the insular ribbon.",
             "Acute left MCA territory infarct."),
            ("A 6 mm acute subdural hematoma along the right convexity.", "Small right subdural hematoma."),
            ("Periventricular white matter hypodensities.", "Chronic small vessel ischemic disease."),
            ("Mucosal thickening of the maxillary sinuses.", "Maxillary sinus disease."),
        ],
        "No acute intracranial abnormality.",
    ),
    "CT abdomen and pelvis": (
        [
            "The liver, spleen, pancreas and adrenal glands are unremarkable.",
            "No free fluid or free air.",
            "The bowel is normal in caliber.",
            "The kidneys enhance symmetrically without hydronephrosis.",
        ],
        [
            ("The appendix is dilated to 11 mm with periappendiceal fat stranding.", "Acute appendicitis."),
            ("A 5 mm obstructing stone at the right ureterovesical junction with mild hydronephrosis.",
             "Obstructing right distal ureteral stone."),
            ("Multiple gallstones without gallbladder wall thickening.", "Cholelithiasis without cholecystitis."),
            ("Diverticula of the sigmoid colon with surrounding inflammatory stranding.", "Acute sigmoid diverticulitis."),
            ("A 3.4 cm hypodense lesion in hepatic segment 7.", "Indeterminate hepatic lesion; MRI suggested."),
        ],
        "No acute abdominal or pelvic abnormality.",
    ),
    "MRI knee": (
        [
            "The anterior and posterior cruciate ligaments are intact.",
            "The collateral ligaments are intact.",
            "No joint effusion.",
            "The extensor mechanism is intact.",
        ],
        [
            ("Oblique tear of the posterior horn of the medial meniscus extending to the inferior surface.",
             "Medial meniscus posterior horn tear."),
            ("Discontinuity of the anterior cruciate ligament fibers with bone bruises.", "Complete ACL tear."),
            ("Moderate joint effusion with a small Baker cyst.", "Joint effusion and Baker cyst."),
            ("Full-thickness cartilage loss over the medial femoral condyle.", "Medial compartment osteoarthritis."),
        ],
        "No internal derangement of the knee.",
    ),
    "Ultrasound abdomen": (
        [
            "The liver is normal in size and echotexture.",
            "The common bile duct measures 4 mm.",
            "The gallbladder is normal without stones.",
            "Both kidneys are normal in size without hydronephrosis.",
        ],
        [
            ("The liver is diffusely echogenic.", "Hepatic steatosis."),
            ("Gallbladder wall thickening to 5 mm with pericholecystic fluid and a positive sonographic Murphy sign.",
             "Acute cholecystitis."),
            ("A 1.8 cm simple cyst in the upper pole of the left kidney.", "Simple left renal cyst."),
        ],
        "Normal abdominal ultrasound.",
    ),
}


INDICATIONS = {
    "Chest X-ray": ["Cough.", "Fever and cough.", "Shortness of breath.", "Chest pain.", "Preoperative."],
    "CT head": ["Headache.", "Fall, head strike.", "Confusion.", "Dizziness."],
    "CT abdomen and pelvis": ["Abdominal pain.", "Right lower quadrant pain.", "Weight loss.", "Nausea."],
    "MRI knee": ["Knee pain after a twisting injury.", "Swelling of the knee.", "Locking of the knee."],
    "Ultrasound abdomen": ["Right upper quadrant pain.", "Abnormal liver tests.", "Jaundice."],
}


def make_context(rng: random.Random, modality: str, findings: str) -> tuple[str, str]:
    """The request's indication and its comparison: the findings' own comparison line where they have one, else a
    prior study or "None." (as reports write)."""
    comparison = f"{modality} from {rng.randint(2, 400)} days ago." if rng.random() < 0.4 else "None."
    if findings.startswith("Comparison: "):
        comparison = findings.split(". ", 1)[0].removeprefix("Comparison: ").capitalize() + "."
    return rng.choice(INDICATIONS[modality]), comparison


def make_report(rng: random.Random, modality: str) -> tuple[str, str]:
    normal, abnormal, normal_impression = STUDIES[modality]
    sentences = rng.sample(normal, k=rng.randint(2, len(normal)))
    impressions = []
    for sentence, impression in rng.sample(abnormal, k=rng.choice([0, 1, 1, 2])):
        sentences.insert(rng.randrange(len(sentences) + 1), sentence)
        impressions.append(impression)
    if rng.random() < 0.15:  # some reports carry a comparison line, as real ones do
        sentences.insert(0, f"Comparison: prior study from {rng.randint(1, 28)} days ago.")
    if rng.random() < 0.1:  # and some are long, with the whole normal list repeated as a checklist
        sentences += [f"Checklist: {s}" for s in normal]
    findings = " ".join(sentences)
    if impressions:
        impression = " ".join(f"{i + 1}. {text}" for i, text in enumerate(impressions)) if len(impressions) > 1 else impressions[0]
    else:
        impression = normal_impression
    return findings, impression


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=300)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("radiology.csv"))
    args = parser.parse_args()
    rng, context_rng = random.Random(args.seed), random.Random(args.seed + 1)
    with args.out.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "modality", "indication", "comparison", "findings", "impression"])
        for n in range(args.rows):
            modality = rng.choice(list(STUDIES))
            findings, impression = make_report(rng, modality)
            writer.writerow([f"RAD-{n + 1:05d}", modality, *make_context(context_rng, modality, findings), findings, impression])
    print(f"wrote {args.rows} rows to {args.out}")


if __name__ == "__main__":
    main()
