"""Writes capitals.jsonl: a four-way multiple-choice task (the country's capital against three
other capitals), deterministic, so both backends are scored on the same questions."""

import json
import random

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "United Kingdom": "London", "Ireland": "Dublin", "Netherlands": "Amsterdam", "Belgium": "Brussels",
    "Austria": "Vienna", "Switzerland": "Bern", "Poland": "Warsaw", "Czech Republic": "Prague",
    "Hungary": "Budapest", "Greece": "Athens", "Sweden": "Stockholm", "Norway": "Oslo",
    "Denmark": "Copenhagen", "Finland": "Helsinki", "Iceland": "Reykjavik", "Russia": "Moscow",
    "Ukraine": "Kyiv", "Romania": "Bucharest", "Bulgaria": "Sofia", "Serbia": "Belgrade",
    "Croatia": "Zagreb", "Turkey": "Ankara", "Egypt": "Cairo", "Morocco": "Rabat", "Kenya": "Nairobi",
    "Nigeria": "Abuja", "Ethiopia": "Addis Ababa", "Ghana": "Accra", "South Africa": "Pretoria",
    "Algeria": "Algiers", "Tunisia": "Tunis", "Senegal": "Dakar", "Uganda": "Kampala",
    "Tanzania": "Dodoma", "Zimbabwe": "Harare", "China": "Beijing", "Japan": "Tokyo",
    "South Korea": "Seoul", "India": "New Delhi", "Pakistan": "Islamabad", "Bangladesh": "Dhaka",
    "Thailand": "Bangkok", "Vietnam": "Hanoi", "Indonesia": "Jakarta", "Philippines": "Manila",
    "Malaysia": "Kuala Lumpur", "Nepal": "Kathmandu", "Iran": "Tehran", "Iraq": "Baghdad",
    "Saudi Arabia": "Riyadh", "Israel": "Jerusalem", "Jordan": "Amman", "Lebanon": "Beirut",
    "Syria": "Damascus", "Afghanistan": "Kabul", "Mongolia": "Ulaanbaatar", "Kazakhstan": "Astana",
    "United States": "Washington", "Canada": "Ottawa", "Mexico": "Mexico City", "Cuba": "Havana",
    "Brazil": "Brasilia", "Argentina": "Buenos Aires", "Chile": "Santiago", "Peru": "Lima",
    "Colombia": "Bogota", "Venezuela": "Caracas", "Ecuador": "Quito", "Bolivia": "La Paz",
    "Uruguay": "Montevideo", "Paraguay": "Asuncion", "Australia": "Canberra",
    "New Zealand": "Wellington", "Jamaica": "Kingston", "Panama": "Panama City",
    "Costa Rica": "San Jose", "Guatemala": "Guatemala City", "Honduras": "Tegucigalpa",
    "Nicaragua": "Managua", "Sri Lanka": "Colombo", "Myanmar": "Naypyidaw", "Cambodia": "Phnom Penh",
    "Laos": "Vientiane", "Qatar": "Doha", "Kuwait": "Kuwait City", "Oman": "Muscat", "Yemen": "Sanaa",
    "Libya": "Tripoli", "Sudan": "Khartoum", "Angola": "Luanda", "Mozambique": "Maputo",
    "Zambia": "Lusaka", "Estonia": "Tallinn", "Latvia": "Riga", "Lithuania": "Vilnius",
    "Slovakia": "Bratislava", "Slovenia": "Ljubljana", "Albania": "Tirana", "Georgia": "Tbilisi",
    "Armenia": "Yerevan", "Azerbaijan": "Baku", "Belarus": "Minsk", "Luxembourg": "Luxembourg",
}


def main() -> None:
    rng = random.Random(2024)
    cities = sorted(CAPITALS.values())
    with open("capitals.jsonl", "w") as f:
        for country, capital in CAPITALS.items():
            choices = [capital] + rng.sample([c for c in cities if c != capital], 3)
            rng.shuffle(choices)
            f.write(json.dumps({"country": country, "choices": choices, "answer": choices.index(capital)}) + "\n")


if __name__ == "__main__":
    main()
